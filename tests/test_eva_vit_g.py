"""EVA ViT-g (BLIP-2's encoder): parity with transformers' Blip2VisionModel and timm's Eva on the
same random weights, every checkpoint format, position-embedding interpolation, strict loading,
freezing and dtype. Tiny configs only (width 32, 3 blocks, patch 14)."""

from __future__ import annotations

import json
import pickle

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from vlbridge.errors import VLBridgeError, WeightsError  # noqa: E402
from vlbridge.plugins.encoders import eva_vit_g  # noqa: E402
from vlbridge.plugins.encoders.eva_vit_g import EvaVitGOptions  # noqa: E402
from vlbridge.plugins.encoders.eva_vit_g_convert import (  # noqa: E402
    convert_hf_blip2_vision_state_dict,
    convert_lavis_vision_state_dict,
    convert_timm_eva_state_dict,
    to_hf_blip2_vision_state_dict,
)
from vlbridge.plugins.encoders.eva_vit_g_model import EvaViTG, build, resize_pos_embed  # noqa: E402

TINY = dict(variant="tiny", width=32, depth=3, heads=4, mlp_hidden=64, patch_size=14, image_size=28)


def _opts(**overrides) -> EvaVitGOptions:
    return EvaVitGOptions(**{**TINY, **overrides})


def _randomise(module, seed: int = 0) -> None:
    """Weights with real signal (transformers' BLIP-2 initialises with std 1e-10)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * 0.1
            param.copy_(1 + noise if "norm" in name and name.endswith("weight") else noise)


def _pixels(size: int = 28, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _hf_vision_config(layers: int = 3, image_size: int = 28):
    from transformers import Blip2VisionConfig

    return Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                             image_size=image_size, patch_size=14, attn_implementation="eager")


@pytest.fixture(scope="module")
def hf_blip2_dir(tmp_path_factory):
    """A faithful transformers BLIP-2 directory (tiny OPT), its vision model with random weights."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, OPTConfig

    qformer = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=99)
    text = OPTConfig(vocab_size=99, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32,
                     word_embed_proj_dim=16, max_position_embeddings=64)
    config = Blip2Config(vision_config=_hf_vision_config().to_dict(), qformer_config=qformer.to_dict(),
                         text_config=text.to_dict(), num_query_tokens=4)
    model = Blip2ForConditionalGeneration(config).eval()
    _randomise(model.vision_model)
    directory = tmp_path_factory.mktemp("blip2")
    model.save_pretrained(directory)
    return directory, model.vision_model


def _hf_hidden_states(vision, pixels, **kwargs):
    with torch.no_grad():
        out = vision(pixels, output_hidden_states=True, **kwargs)
    # BLIP-2's features are the blocks' output BEFORE post_layernorm (that LN is the connector's ln_vision)
    torch.testing.assert_close(out.last_hidden_state, vision.post_layernorm(out.hidden_states[-1]))
    return out.hidden_states


def test_equals_transformers_blip2_vision_model(hf_blip2_dir):
    directory, vision = hf_blip2_dir
    assert vision.encoder.layers[0].self_attn.qkv.bias[32:64].abs().sum() > 0  # a k bias that must not matter
    encoder = build(_opts(pretrained=str(directory)))
    pixels = _pixels()
    with torch.no_grad():
        ours = encoder(pixels)
    assert ours.shape == (2, 5, 32)
    torch.testing.assert_close(ours, _hf_hidden_states(vision, pixels)[-1], atol=1e-5, rtol=0)


def test_single_blip2_safetensors_file(hf_blip2_dir):
    directory, vision = hf_blip2_dir
    encoder = EvaViTG(_opts())
    assert encoder.load_pretrained(directory / "model.safetensors") == "transformers BLIP-2 state dict"
    with torch.no_grad():
        torch.testing.assert_close(encoder(_pixels()), _hf_hidden_states(vision, _pixels())[-1], atol=1e-5, rtol=0)


def test_blip2_keeps_all_but_the_last_block(hf_blip2_dir):
    """Variant g keeps depth - 1 blocks: the checkpoint's last block is skipped, output = its input."""
    directory, vision = hf_blip2_dir
    encoder = build(_opts(variant="g", pretrained=str(directory)))
    assert len(encoder.blocks) == 2
    pixels = _pixels()
    with torch.no_grad():
        ours = encoder(pixels)
    torch.testing.assert_close(ours, _hf_hidden_states(vision, pixels)[-2], atol=1e-5, rtol=0)


def test_saved_blip2_vision_model_and_pytorch_bin(tmp_path, hf_blip2_dir):
    from transformers import Blip2VisionModel

    _, vision = hf_blip2_dir
    bare = tmp_path / "vision"
    Blip2VisionModel(_hf_vision_config()).save_pretrained(bare)  # bare keys, model_type blip_2_vision_model
    assert isinstance(EvaViTG(_opts()).load_pretrained(bare), str)
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    torch.save({f"vision_model.{k}": v for k, v in vision.state_dict().items()}, binary / "pytorch_model.bin")
    encoder = build(_opts(pretrained=str(binary)))
    torch.testing.assert_close(encoder(_pixels()), _hf_hidden_states(vision, _pixels())[-1], atol=1e-5, rtol=0)


def test_sharded_safetensors_directory_reads_only_vision_shards(tmp_path, hf_blip2_dir):
    _, vision = hf_blip2_dir
    state = {f"vision_model.{k}": v.contiguous() for k, v in vision.state_dict().items()}
    keys = sorted(state)
    save_file({k: state[k] for k in keys[:10]}, tmp_path / "model-00001-of-00003.safetensors")
    save_file({k: state[k] for k in keys[10:]}, tmp_path / "model-00002-of-00003.safetensors")
    (tmp_path / "model-00003-of-00003.safetensors").write_bytes(b"corrupt: must never be opened")
    weight_map = {k: f"model-0000{1 if i < 10 else 2}-of-00003.safetensors" for i, k in enumerate(keys)}
    weight_map["language_model.lm_head.weight"] = "model-00003-of-00003.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    encoder = build(_opts(pretrained=str(tmp_path)))
    torch.testing.assert_close(encoder(_pixels()), _hf_hidden_states(vision, _pixels())[-1], atol=1e-5, rtol=0)


def test_export_to_transformers_round_trip():
    from transformers import Blip2VisionModel

    ours = EvaViTG(_opts())
    _randomise(ours, seed=3)
    hf = Blip2VisionModel(_hf_vision_config()).eval()
    exported = to_hf_blip2_vision_state_dict(ours.state_dict(), prefix="")
    post = {f"post_layernorm.{k}": v for k, v in hf.post_layernorm.state_dict().items()}
    hf.load_state_dict({**exported, **post}, strict=True)
    pixels = _pixels()
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels), _hf_hidden_states(hf, pixels)[-1], atol=1e-5, rtol=0)
    assert convert_hf_blip2_vision_state_dict(exported).keys() == ours.state_dict().keys()


def test_lavis_checkpoint(tmp_path):
    source = EvaViTG(_opts())
    _randomise(source, seed=4)
    state = {f"visual_encoder.{k}": v for k, v in source.state_dict().items()}
    state.update({"ln_vision.weight": torch.ones(32), "query_tokens": torch.zeros(1, 4, 32),
                  "Qformer.bert.embeddings.LayerNorm.weight": torch.ones(32)})  # other BLIP-2 parts
    torch.save({"model": state, "epoch": 3}, tmp_path / "blip2_pretrained.pth")  # LAVIS's checkpoint layout
    assert convert_lavis_vision_state_dict(state).keys() == source.state_dict().keys()
    encoder = build(_opts(pretrained=str(tmp_path / "blip2_pretrained.pth")))
    with torch.no_grad():
        torch.testing.assert_close(encoder(_pixels()), source(_pixels()), atol=0, rtol=0)


def test_open_clip_timm_eva_checkpoint(tmp_path):
    from timm.models.eva import Eva

    trunk = Eva(img_size=28, patch_size=14, embed_dim=32, depth=3, num_heads=4, mlp_ratio=2.0, num_classes=0,
                global_pool="token").eval()  # EVA-CLIP's pooling: a final norm, which BLIP-2 does not use
    _randomise(trunk, seed=5)
    state = {f"visual.trunk.{k}": v for k, v in trunk.state_dict().items()}
    state.update({"visual.head.proj.weight": torch.zeros(8, 32), "text.token_embedding.weight": torch.zeros(9, 8),
                  "logit_scale": torch.ones([])})  # the rest of an OpenCLIP EVA model
    save_file(state, tmp_path / "open_clip_model.safetensors")
    converted = convert_timm_eva_state_dict(state)
    assert "norm.weight" not in converted and "blocks.2.attn.q_bias" in converted
    encoder = build(_opts(pretrained=str(tmp_path / "open_clip_model.safetensors")))
    trunk.norm = torch.nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(encoder(_pixels()), trunk.forward_features(_pixels()), atol=1e-5, rtol=0)


def test_own_safetensors_round_trip_and_spec_agreement(tmp_path):
    source = build(_opts())
    save_file(source.state_dict(), tmp_path / "eva.safetensors")
    opts = _opts(pretrained=str(tmp_path / "eva.safetensors"))
    loaded = build(opts)
    assert torch.equal(loaded(_pixels()), source(_pixels()))
    assert loaded.output_shape == eva_vit_g.output(opts)
    assert loaded.preprocess == eva_vit_g.preprocess(opts)
    assert sum(p.numel() for p in loaded.parameters()) == eva_vit_g.num_params(opts)


def test_encoder_directory_states_its_architecture(tmp_path):
    """A vlbridge encoder directory (config.json + model.safetensors) decides the architecture, read
    before any weight loads, and loads strictly; explicit options still override it."""
    arch = {"width": 32, "depth": 3, "heads": 2, "mlp_hidden": 64, "patch_size": 8, "num_blocks": 3, "image_size": 32}
    source = EvaViTG(EvaVitGOptions(variant="tiny", **arch))
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "eva-vit", **arch}))
    opts = EvaVitGOptions(pretrained=str(tmp_path))
    assert eva_vit_g.output(opts) == eva_vit_g.TokenShape(17, 32) and opts.resolved_blocks == 3
    loaded = build(opts)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), source.state_dict().values()))
    assert eva_vit_g.output(EvaVitGOptions(pretrained=str(tmp_path), image_size=48)).num_tokens == 37  # positions interpolated
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "eva-vit", "width": 32}))
    with pytest.raises(ValueError, match=r"lacks integer fields \['depth'"):
        EvaVitGOptions(pretrained=str(tmp_path))


def test_pos_embed_interpolation_224_to_364_equals_transformers(tmp_path):
    from transformers import Blip2VisionModel

    hf = Blip2VisionModel(_hf_vision_config(layers=1, image_size=224)).eval()
    _randomise(hf, seed=6)
    hf.save_pretrained(tmp_path)
    encoder = build(_opts(depth=1, image_size=364, pretrained=str(tmp_path)))
    assert encoder.pos_embed.shape == (1, 677, 32) and encoder.output_shape.num_tokens == 677
    assert torch.equal(encoder.pos_embed[:, :1], hf.embeddings.position_embedding[:, :1])  # [CLS] kept
    pixels = _pixels(364, batch=1)
    expected = _hf_hidden_states(hf, pixels, interpolate_pos_encoding=True)[-1]
    torch.testing.assert_close(encoder(pixels), expected, atol=1e-5, rtol=0)


def test_resize_pos_embed_refuses_non_square_grids():
    with pytest.raises(WeightsError, match="1 \\+ a square grid"):
        resize_pos_embed(torch.zeros(1, 11, 8), 17)
    same = torch.randn(1, 17, 8)
    assert resize_pos_embed(same, 17) is same


def _state(**changes):
    state = EvaViTG(_opts()).state_dict()
    for key, value in changes.items():
        if value is None:
            state.pop(key)
        else:
            state[key] = value
    return state


@pytest.mark.parametrize("changes, message", [
    ({"blocks.1.attn.q_bias": None}, r"1 missing: blocks\.1\.attn\.q_bias"),
    ({"blocks.0.attn.relative_position_bias_table": torch.zeros(3, 4)}, r"1 unexpected: blocks\.0\.attn\.relative_position_bias_table"),
    ({"blocks.3.norm1.weight": torch.ones(32)}, r"unexpected: blocks\.3\.norm1\.weight"),  # beyond depth 3: not skipped
    ({"blocks.0.mlp.fc1.weight": torch.zeros(48, 32)}, r"tensor 'blocks\.0\.mlp\.fc1\.weight' has shape \(48, 32\) in the checkpoint but the model needs \(64, 32\)"),
])
def test_strict_load_errors(tmp_path, changes, message):
    save_file(_state(**changes), tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError, match=message) as err:
        build(_opts(pretrained=str(tmp_path / "bad.safetensors")))
    assert "bad.safetensors" in str(err.value)


def test_checkpoint_with_too_few_blocks_lists_missing_keys(tmp_path):
    save_file(EvaViTG(_opts(depth=2)).state_dict(), tmp_path / "two.safetensors")
    with pytest.raises(WeightsError, match=r"13 missing: blocks\.2\.attn\.proj\.bias"):
        build(_opts(pretrained=str(tmp_path / "two.safetensors")))


def test_unloadable_sources(tmp_path):
    with pytest.raises(WeightsError, match="EVA ViT-g weights not found: .*nowhere.pth"):
        build(_opts(pretrained=str(tmp_path / "nowhere.pth")))
    with pytest.raises(WeightsError, match="no config.json"):
        build(_opts(pretrained=str(tmp_path)))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(WeightsError, match="model_type 'clip'; expected one of"):
        build(_opts(pretrained=str(tmp_path)))
    unsafe = tmp_path / "unsafe.pth"
    with unsafe.open("wb") as file:
        pickle.dump({"weights": EvaVitGOptions()}, file, protocol=2)  # an arbitrary object: refused, never unpickled
    with pytest.raises(WeightsError, match="weights_only=True"):
        build(_opts(pretrained=str(unsafe)))


def test_built_frozen_and_train_does_not_unfreeze():
    encoder = build(_opts())
    assert encoder.frozen and not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training and not any(b.training for b in encoder.blocks)


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dtype_option(dtype, torch_dtype, tmp_path):
    reference = build(_opts())
    save_file(reference.state_dict(), tmp_path / "eva.safetensors")
    encoder = build(_opts(dtype=dtype, pretrained=str(tmp_path / "eva.safetensors")))
    assert {p.dtype for p in encoder.parameters()} == {torch_dtype}
    out = encoder(_pixels())  # float32 pixels are cast to the encoder's dtype
    assert out.dtype == torch_dtype
    torch.testing.assert_close(out.float(), reference(_pixels()), atol=0.05, rtol=0.05)


def test_wrong_pixel_shape_is_explained():
    with pytest.raises(VLBridgeError, match=r"expects pixels shaped \(B, 3, 28, 28\), got \(1, 3, 56, 56\)"):
        build(_opts())(torch.zeros(1, 3, 56, 56))


def test_factory_is_reachable_from_the_spec():
    from vlbridge import get_registry

    spec = get_registry().resolve("encoder", "eva-vit-g").spec
    encoder = spec.load_factory()(spec.options(variant="tiny"))
    assert isinstance(encoder, EvaViTG) and encoder.output_shape == spec.output(spec.options(variant="tiny"))


@pytest.mark.parametrize(("options", "message"), [
    ({"heads": 8}, r"has 4 attention heads, not 8 \(set heads: 4\)"),
    ({"layer_norm_eps": 1e-5}, r"runs its LayerNorms with epsilon 1e-06, not 1e-05 \(set layer_norm_eps: 1e-06\)"),
])
def test_a_blip2_directory_whose_heads_or_epsilon_differ_is_refused(hf_blip2_dir, options, message):
    """Neither shows in a tensor's shape: the weights loaded and the tower computed something else."""
    directory, _ = hf_blip2_dir
    with pytest.raises(ValueError, match=message):
        _opts(pretrained=str(directory), **options)


def test_a_blip2_directory_without_qkv_biases_loads_as_transformers_runs_it(tmp_path):
    """qkv_bias=False saves no biases; eva-vit-g refused the directory (missing q_bias/v_bias) where the
    importer filled zeros. Both fill zeros now, which compute the same attention."""
    from transformers import Blip2VisionModel

    config = _hf_vision_config()
    config.qkv_bias = False
    vision = Blip2VisionModel(config).eval()
    _randomise(vision)
    vision.save_pretrained(tmp_path)
    assert not any("qkv.bias" in key for key in vision.state_dict())
    encoder = build(_opts(pretrained=str(tmp_path)))
    with torch.no_grad():
        torch.testing.assert_close(encoder(_pixels()), _hf_hidden_states(vision, _pixels())[-1], atol=1e-5, rtol=0)
