"""CLIP ViT-L/14 via open_clip: tiny towers saved and loaded by path, layer selection against open_clip's
own modules and transformers' CLIPVisionModel, [CLS] handling, strict loading, tags offline, shapes."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
from open_clip.model import _build_vision_tower  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from vlbridge.errors import VLBridgeError, WeightsError  # noqa: E402
from vlbridge.plugins.encoders import clip_vit_l  # noqa: E402
from vlbridge.plugins.encoders.clip_vit_l import ClipVitLOptions  # noqa: E402
from vlbridge.plugins.encoders.clip_vit_l_model import ClipVisionEncoder, build, resolve_weights, vision_cfg  # noqa: E402


def _tiny(**kw) -> ClipVitLOptions:
    return ClipVitLOptions(variant="tiny", **kw)


def _pixels(size: int = 56, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _randomise(module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * 0.1
            param.copy_(1 + noise if ".ln_" in f".{name}" and name.endswith("weight") else noise)


def _open_clip_tower(image_size: int = 56, quick_gelu: bool = False):
    """A complete open_clip vision tower with the tiny architecture (ln_post and proj included)."""
    embed_dim, cfg = vision_cfg(_tiny(image_size=image_size))
    tower = _build_vision_tower(embed_dim, cfg, quick_gelu=quick_gelu).eval()
    _randomise(tower)
    return tower


@pytest.fixture(scope="module")
def tower():
    return _open_clip_tower()


@pytest.fixture(scope="module")
def checkpoint(tower, tmp_path_factory):
    """A full-CLIP style open_clip checkpoint: `visual.*` plus text-tower keys that are not ours."""
    state = {f"visual.{k}": v for k, v in tower.state_dict().items()}
    state.update({"logit_scale": torch.ones([]), "token_embedding.weight": torch.zeros(10, 8)})
    path = tmp_path_factory.mktemp("clip") / "open_clip_model.safetensors"
    save_file(state, path)
    return path


def _open_clip_block_output(tower, pixels, index: int) -> torch.Tensor:
    """Block `index`'s tokens ([CLS] first) from open_clip's own forward_intermediates."""
    with torch.no_grad():
        out = tower.forward_intermediates(pixels, indices=[index], intermediates_only=True, output_fmt="NLC",
                                          output_extra_tokens=True)
    return torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)


@pytest.mark.parametrize("layer, block", [(-2, 0), (-1, 1), (0, 0), (1, 1)])
def test_layer_selection_equals_open_clip(tower, checkpoint, layer, block):
    encoder = build(_tiny(layer=layer, pretrained=str(checkpoint)))
    assert len(encoder.tower.transformer.resblocks) == block + 1  # later blocks are dropped: never run
    pixels = _pixels()
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels), _open_clip_block_output(tower, pixels, block), atol=1e-5, rtol=0)


def test_include_cls(checkpoint):
    with_cls = build(_tiny(pretrained=str(checkpoint)))
    without = build(_tiny(include_cls=False, pretrained=str(checkpoint)))
    pixels = _pixels()
    assert with_cls(pixels).shape == (2, 17, 64) and without(pixels).shape == (2, 16, 64)
    assert torch.equal(without(pixels), with_cls(pixels)[:, 1:])


def test_visual_only_pt_file_loads(tower, tmp_path):
    torch.save({"state_dict": {f"module.{k}": v for k, v in tower.state_dict().items()}}, tmp_path / "tower.pt")
    encoder = build(_tiny(pretrained=str(tmp_path / "tower.pt")))
    torch.testing.assert_close(encoder(_pixels()), _open_clip_block_output(tower, _pixels(), 0), atol=1e-5, rtol=0)


def test_equals_transformers_clip_hidden_states(tmp_path):
    """LLaVA's features: CLIPVisionModel(...).hidden_states[-2]; QuickGELU taken from the config."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              image_size=56, patch_size=14, hidden_act="quick_gelu", projection_dim=32)
    hf = CLIPVisionModel(config).eval()
    _randomise(hf, seed=2)
    hf.save_pretrained(tmp_path)
    pixels = _pixels()
    with torch.no_grad():
        hidden = hf(pixels, output_hidden_states=True).hidden_states
    for layer in (-2, -1):
        encoder = build(_tiny(layer=layer, include_cls=False, pretrained=str(tmp_path)))
        assert encoder.quick_gelu
        torch.testing.assert_close(encoder(pixels), hidden[layer][:, 1:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("drop, add, message", [
    ("visual.transformer.resblocks.0.attn.in_proj_bias", {}, r"1 missing: transformer\.resblocks\.0\.attn\.in_proj_bias"),
    (None, {"visual.transformer.resblocks.0.attn.extra": torch.zeros(2)}, r"1 unexpected: transformer\.resblocks\.0\.attn\.extra"),
    (None, {"visual.transformer.resblocks.2.ln_1.weight": torch.ones(64)}, r"unexpected: transformer\.resblocks\.2\.ln_1\.weight"),
    (None, {"visual.positional_embedding": torch.zeros(37, 64)},
     r"tensor 'positional_embedding' has shape \(37, 64\) in the checkpoint but the model needs \(17, 64\)"),
])
def test_strict_load_errors(tower, tmp_path, drop, add, message):
    state = {f"visual.{k}": v for k, v in tower.state_dict().items()}
    state.pop(drop, None)
    state.update(add)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError, match=message) as err:
        build(_tiny(pretrained=str(tmp_path / "bad.safetensors")))
    assert "open_clip checkpoint" in str(err.value) and "bad.safetensors" in str(err.value)


def test_missing_file_and_tags_offline(monkeypatch, tmp_path):
    with pytest.raises(WeightsError, match="CLIP weights not found: .*nope.safetensors"):
        build(_tiny(pretrained=str(tmp_path / "nope.safetensors")))
    with pytest.raises(VLBridgeError, match="variant 'tiny' has no open_clip weights"):
        build(_tiny(pretrained="openai"))
    with pytest.raises(VLBridgeError, match="'nonsense' is neither a local file nor an open_clip tag of ViT-L-14-336; tags: openai"):
        build(ClipVitLOptions(image_size=336, pretrained="nonsense"))

    def offline(cfg, *args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(open_clip, "download_pretrained", offline)
    with pytest.raises(WeightsError, match=r"cannot fetch open_clip weights ViT-L-14/openai \(offline\?\).*Network is unreachable"):
        build(ClipVitLOptions(pretrained="openai"))


def test_openai_tag_turns_quick_gelu_on(monkeypatch, tmp_path):
    monkeypatch.setattr(open_clip, "download_pretrained", lambda cfg, *a, **k: str(tmp_path / "ViT-L-14.safetensors"))
    assert resolve_weights(ClipVitLOptions(pretrained="openai")) == (tmp_path / "ViT-L-14.safetensors", True)
    assert resolve_weights(ClipVitLOptions(pretrained="openai", quick_gelu=False))[1] is False
    assert resolve_weights(ClipVitLOptions(pretrained="laion2b_s32b_b82k"))[1] is False


def test_quick_gelu_option_matches_open_clip(tmp_path):
    reference = _open_clip_tower(quick_gelu=True)
    save_file(reference.state_dict(), tmp_path / "quick.safetensors")
    encoder = build(_tiny(layer=-1, quick_gelu=True, pretrained=str(tmp_path / "quick.safetensors")))
    torch.testing.assert_close(encoder(_pixels()), _open_clip_block_output(reference, _pixels(), 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("options", [
    {"variant": "tiny"}, {"variant": "tiny", "include_cls": False, "image_size": 84}, {"variant": "tiny", "layer": 0},
    {}, {"image_size": 336, "include_cls": False}, {"image_size": 336, "layer": -24},
])
def test_real_output_shape_equals_spec(options):
    """ViT-L is built on 'meta' (no memory, no compute); shapes still flow through open_clip's modules."""
    opts = ClipVitLOptions(**options)
    encoder = ClipVisionEncoder(opts, device=None if opts.variant == "tiny" else "meta")
    size = opts.resolved_image_size
    device = "cpu" if opts.variant == "tiny" else "meta"
    out = encoder(torch.zeros(1, 3, size, size, device=device))
    assert tuple(out.shape[1:]) == (clip_vit_l.output(opts).num_tokens, clip_vit_l.output(opts).width)
    assert encoder.output_shape == clip_vit_l.output(opts)
    assert encoder.preprocess == clip_vit_l.preprocess(opts)


def test_frozen_dtype_and_pixel_check(checkpoint):
    encoder = build(_tiny(dtype="bf16", pretrained=str(checkpoint)))
    assert encoder.frozen and not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training
    assert {p.dtype for p in encoder.parameters()} == {torch.bfloat16}
    out = encoder(_pixels())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), build(_tiny(pretrained=str(checkpoint)))(_pixels()), atol=0.1, rtol=0.05)
    with pytest.raises(VLBridgeError, match=r"expects pixels shaped \(B, 3, 56, 56\)"):
        encoder(torch.zeros(1, 3, 28, 28))


def test_factory_is_reachable_from_the_spec():
    from vlbridge import get_registry

    spec = get_registry().resolve("encoder", "clip-vit-l").spec
    encoder = spec.load_factory()(spec.options(variant="tiny", include_cls=False))
    assert isinstance(encoder, ClipVisionEncoder) and encoder.output_shape.num_tokens == 16
