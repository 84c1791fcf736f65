"""The `open-clip` encoder: tokens equal to open_clip's own blocks (a native ViT and a SigLIP-style
timm trunk, random tiny configs registered with open_clip), declared shapes equal to built ones
for real architectures (on 'meta'), preprocessing equal to open_clip's pretrained table, clear
errors, and a stage-1 Q-Former that trains on its tokens."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
from safetensors.torch import save_file  # noqa: E402

from tests.generic_encoders import heavy_modules_after, registry_for, stage1_losses, validated_encoder_line  # noqa: E402
from tests.hf_tiny import redraw  # noqa: E402
from vlbridge.errors import VLBridgeError, WeightsError  # noqa: E402
from vlbridge.plugins.encoders import open_clip_tower  # noqa: E402
from vlbridge.plugins.encoders.open_clip_params import NATIVE_DEFAULTS  # noqa: E402
from vlbridge.plugins.encoders.open_clip_tower import OpenClipOptions  # noqa: E402
from vlbridge.plugins.encoders.open_clip_tower_model import OpenClipTower, _check_tag_preprocessing, build  # noqa: E402
from vlbridge.plugin.specs import CLIP_MEAN, CLIP_STD, Preprocess, TokenShape  # noqa: E402
from vlbridge.plugintest.check import using_registry  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT_CFG = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
TINY_TIMM = "vit_tiny_patch14_siglip_56"  # 'tiny' -> width 192 in the size table; 2 blocks here
CONFIGS = {
    "vlbridge-test-vit": {"embed_dim": 32, "vision_cfg": {"image_size": 56, "layers": 3, "width": 64, "head_width": 16, "patch_size": 14},
                          "text_cfg": TEXT_CFG},
    "vlbridge-test-siglip": {"embed_dim": 192, "vision_cfg": {"image_size": 56, "timm_model_name": TINY_TIMM, "timm_model_pretrained": False,
                                                              "timm_pool": "map", "timm_proj": "none"}, "text_cfg": TEXT_CFG},
}


def _register_tiny_timm_vit() -> None:
    """A 2-block SigLIP-style timm ViT (no class token, attention-pool head), so the test needs no download."""
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    if timm.is_model(TINY_TIMM):
        return

    def vit_tiny_patch14_siglip_56(pretrained: bool = False, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
        args = dict(img_size=56, patch_size=14, embed_dim=192, depth=2, num_heads=3, class_token=False, global_pool="map")
        return VisionTransformer(**{**args, **kwargs})

    register_model(vit_tiny_patch14_siglip_56)




@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (config JSON path, weights file, the open_clip model they came from)."""
    pytest.importorskip("timm")
    _register_tiny_timm_vit()
    folder = tmp_path_factory.mktemp("open_clip_configs")
    for name, config in CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    out = {}
    for name in CONFIGS:
        model = open_clip.create_model(name, pretrained=None).eval()
        redraw(model, std=0.1, seed=len(out))
        weights = folder / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
        out[name] = (str(folder / f"{name}.json"), str(weights), model)
    return out


def _pixels(size: int = 56) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _block_outputs(model, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output during open_clip's own encode_image, caught with forward hooks."""
    visual = model.visual
    blocks = visual.trunk.blocks if hasattr(visual, "trunk") else visual.transformer.resblocks
    caught: list[torch.Tensor] = []
    handles = [block.register_forward_hook(lambda mod, args, out: caught.append(out)) for block in blocks]
    try:
        with torch.no_grad():
            model.encode_image(pixels)
    finally:
        for handle in handles:
            handle.remove()
    return caught


@pytest.mark.parametrize("name, layer, include_cls, block", [
    ("vlbridge-test-vit", -2, True, 1), ("vlbridge-test-vit", -1, True, 2), ("vlbridge-test-vit", 0, True, 0),
    ("vlbridge-test-vit", -2, False, 1), ("vlbridge-test-siglip", -2, True, 0), ("vlbridge-test-siglip", -1, False, 1),
])
def test_tokens_equal_open_clip_blocks(tiny, name, layer, include_cls, block):
    arch, weights, model = tiny[name]
    encoder = build(OpenClipOptions(arch=arch, pretrained=weights, layer=layer, include_cls=include_cls))
    pixels = _pixels()
    expected = _block_outputs(model, pixels)[block]
    if not include_cls and name == "vlbridge-test-vit":
        expected = expected[:, 1:]
    with torch.no_grad():
        got = encoder(pixels)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert tuple(got.shape[1:]) == (open_clip_tower.output(encoder.opts).num_tokens, open_clip_tower.output(encoder.opts).width)
    assert len(encoder._blocks()) == block + 1  # later blocks were pruned: never run


@pytest.mark.parametrize("name", ["vlbridge-test-vit", "vlbridge-test-siglip"])
def test_image_size_override_equals_open_clip_force_image_size(tiny, name):
    arch, weights, _ = tiny[name]
    reference = open_clip.create_model(name, pretrained=weights, force_image_size=84).eval()
    encoder = build(OpenClipOptions(arch=arch, pretrained=weights, layer=-1, image_size=84))
    pixels = _pixels(84)
    with torch.no_grad():
        got = encoder(pixels)
    expected = _block_outputs(reference, pixels)[-1]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert got.shape[1] == open_clip_tower.output(encoder.opts).num_tokens == 36 + (1 if name.endswith("vit") else 0)


@pytest.mark.parametrize("options, shape", [
    ({"arch": "ViT-B-32"}, TokenShape(50, 768)),
    ({"arch": "ViT-L-14-336", "include_cls": False}, TokenShape(576, 1024)),
    ({"arch": "ViT-SO400M-14-SigLIP-384"}, TokenShape(729, 1152)),  # timm trunk, no class token; 384 px = 27 x 27 patches
    ({"arch": "EVA02-B-16", "layer": 0}, TokenShape(197, 768)),  # timm Eva trunk with a class token
    ({"arch": "ViT-H-14-CLIPA-336", "include_cls": False}, TokenShape(576, 1280)),  # no ln_pre, average pooling
    ({"arch": "coca_ViT-B-32"}, TokenShape(50, 768)),  # attentional pooler: tokens are taken before it
    ({"arch": "ViT-B-16", "image_size": 256}, TokenShape(257, 768)),
    ({"arch": "ViT-B-16-SigLIP", "image_size": 256}, TokenShape(256, 768)),
])
def test_declared_shape_equals_built_on_meta(options, shape):
    opts = OpenClipOptions(**options)
    assert open_clip_tower.output(opts) == shape
    encoder = OpenClipTower(opts, device="meta").finish()
    size = opts.resolved_image_size
    out = encoder(torch.zeros(1, 3, size, size, device="meta"))
    assert (out.shape[1], out.shape[2]) == (shape.num_tokens, shape.width) and encoder.output_shape == shape


def test_preprocessing_equals_open_clips_pretrained_table():
    """Every (architecture, tag) open_clip lists whose tower vlbridge accepts, read without open_clip."""
    checked = 0
    for arch, tag in open_clip.list_pretrained():
        try:
            opts = OpenClipOptions(arch=arch, pretrained=tag)
        except ValueError:
            continue  # a tower without a token sequence (ResNet, ConvNeXt, ...)
        cfg = open_clip.get_pretrained_cfg(arch, tag)
        declared = open_clip_tower.preprocess(opts)
        theirs = (tuple(cfg["mean"]), tuple(cfg["std"]), cfg["interpolation"], cfg["resize_mode"])
        assert (declared.mean, declared.std, declared.interpolation, declared.resize_mode) == theirs, (arch, tag)
        assert declared.image_size == open_clip.get_model_config(arch)["vision_cfg"]["image_size"]
        checked += 1
    assert checked > 100


def test_preprocessing_defaults_and_hub_config_file(tmp_path):
    assert open_clip_tower.preprocess(OpenClipOptions()) == Preprocess(224, CLIP_MEAN, CLIP_STD, "bicubic", "shortest")
    siglip = open_clip_tower.preprocess(OpenClipOptions(arch="ViT-SO400M-14-SigLIP-384"))
    assert siglip == Preprocess(384, (0.5,) * 3, (0.5,) * 3, "bicubic", "squash")
    hub = {"model_cfg": open_clip.get_model_config("ViT-B-32"),
           "preprocess_cfg": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "interpolation": "bilinear", "resize_mode": "squash"}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(hub))
    opts = OpenClipOptions(arch=str(tmp_path / "open_clip_config.json"))
    assert open_clip_tower.preprocess(opts) == Preprocess(224, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "bilinear", "squash")
    assert open_clip_tower.output(opts) == TokenShape(50, 768)


@pytest.mark.parametrize("options, message", [
    ({"arch": "RN50"}, "RN50 is a ResNet.*not a token sequence"),
    ({"arch": "convnext_base"}, "timm trunk 'convnext_base' is not supported: a convnext trunk changes width"),
    ({"arch": "PE-Core-B-16"}, "token layout is not known"),
    ({"arch": "ViT-B-33"}, "'ViT-B-33' is not an open_clip architecture.*did you mean 'ViT-B-32'"),
    ({"arch": "ViT-B-32", "layer": 12}, r"layer 12 is out of range for the 12 blocks of ViT-B-32 \(use -12..11\)"),
    ({"arch": "ViT-SO400M-14-SigLIP", "layer": -28}, "out of range for the 27 blocks"),
    ({"arch": "ViT-B-32", "image_size": 250}, "image_size 250 is not a multiple of the patch size 32"),
    ({"arch": "hf-hub:timm/ViT-B-16-SigLIP"}, "hub and local-dir schemas are not read here"),
    ({"arch": "/nowhere/config.json"}, "open_clip config file not found"),
])
def test_option_errors(options, message):
    with pytest.raises(ValueError, match=message):
        OpenClipOptions(**options)


def test_unknown_timm_size_is_an_option_error(tmp_path):
    config = {"embed_dim": 512, "vision_cfg": {"image_size": 224, "timm_model_name": "vit_colossal_patch14_224"}}
    (tmp_path / "colossal.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown ViT size 'colossal'.*widths are known for tiny, small"):
        OpenClipOptions(arch=str(tmp_path / "colossal.json"))


def test_weights_errors(tiny, tmp_path, monkeypatch):
    arch, weights, model = tiny["vlbridge-test-vit"]
    with pytest.raises(WeightsError, match="open_clip weights not found: .*nope.safetensors"):
        build(OpenClipOptions(arch=arch, pretrained=str(tmp_path / "nope.safetensors")))
    state = {k: v for k, v in model.state_dict().items() if k != "visual.ln_pre.bias"}
    save_file(state, tmp_path / "partial.safetensors")
    with pytest.raises(WeightsError, match=r"1 missing: ln_pre\.bias"):
        build(OpenClipOptions(arch=arch, pretrained=str(tmp_path / "partial.safetensors")))
    with pytest.raises(VLBridgeError, match="arch 'tiny' has no open_clip tags"):
        build(OpenClipOptions(arch="tiny", pretrained="openai"))
    with pytest.raises(VLBridgeError, match="'nonsense' is neither a local file nor an open_clip tag of ViT-B-32; tags: openai"):
        build(OpenClipOptions(arch="ViT-B-32", pretrained="nonsense"))

    def offline(cfg, *args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(open_clip, "download_pretrained", offline)
    with pytest.raises(WeightsError, match=r"cannot fetch open_clip weights ViT-B-32/openai \(offline\?\).*Network is unreachable"):
        build(OpenClipOptions(arch="ViT-B-32", pretrained="openai"))


def test_a_pt_training_checkpoint_loads(tiny, tmp_path):
    """A .pt read with weights_only=True, wrapped as open_clip's training saves it ({'state_dict': {'module.': ...}})."""
    arch, weights, model = tiny["vlbridge-test-vit"]
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "epoch_1.pt")
    pixels = _pixels()
    with torch.no_grad():
        torch.testing.assert_close(build(OpenClipOptions(arch=arch, pretrained=str(tmp_path / "epoch_1.pt")))(pixels),
                                   build(OpenClipOptions(arch=arch, pretrained=weights))(pixels), atol=0, rtol=0)


def test_tag_preprocessing_is_checked_against_open_clip():
    opts = OpenClipOptions(arch="ViT-B-32", pretrained="openai")
    _check_tag_preprocessing(opts, open_clip.get_pretrained_cfg("ViT-B-32", "openai"))
    with pytest.raises(VLBridgeError, match="open_clip preprocesses ViT-B-32/openai with .*update TAG_PREPROCESS"):
        _check_tag_preprocessing(opts, {"mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic", "resize_mode": "shortest"})


def test_frozen_in_bf16_and_pixel_check(tiny):
    arch, weights, _ = tiny["vlbridge-test-vit"]
    encoder = build(OpenClipOptions(arch=arch, pretrained=weights, dtype="bf16"))
    assert encoder.frozen and not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training
    out = encoder(_pixels())
    assert out.dtype == torch.bfloat16
    reference = build(OpenClipOptions(arch=arch, pretrained=weights))(_pixels())
    torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.05)
    with pytest.raises(VLBridgeError, match=r"expects pixels shaped \(B, 3, 56, 56\)"):
        encoder(torch.zeros(1, 3, 28, 28))


def test_a_stage1_qformer_trains_on_it():
    with using_registry(registry_for(open_clip_tower, "open-clip")):
        before, after = stage1_losses({"use": "open-clip", "options": {"arch": "tiny", "include_cls": False}})
    assert before - after > 0.05, (before, after)


def test_the_feature_cache_identity_carries_the_centre_crop():
    from vlbridge.assemblies.assembly import load_assembly
    from vlbridge.train.cache import encoder_identity

    with using_registry(registry_for(open_clip_tower, "open-clip")):
        assembly = load_assembly({"name": "crop", "encoder": {"use": "open-clip", "options": {"arch": "tiny"}},
                                  "connector": {"use": "qformer", "options": {"variant": "tiny"}}})
    assert encoder_identity(assembly, "0").preprocess.resize_mode == "shortest"


def test_declaring_imports_no_torch():
    script = ("from vlbridge.plugins.encoders import open_clip_tower as m\n"
              "for arch in ('ViT-B-16', 'ViT-SO400M-14-SigLIP', 'tiny'):\n"
              "    o = m.OpenClipOptions(arch=arch); m.output(o); m.preprocess(o)\n"
              "m.vlbridge_register_encoders()[0].check()")
    assert heavy_modules_after(script) == []


TINY_CONFIG_VISION = {"image_size": 56, "layers": 3, "width": 64, "head_width": 16, "patch_size": 14}


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("options", [
    {"arch": "ViT-B-32"}, {"arch": "ViT-L-14-336", "layer": 0}, {"arch": "ViT-B-16", "image_size": 256},
    {"arch": "ViT-H-14-CLIPA-336"},  # no ln_pre
    {"arch": "coca_ViT-B-32", "layer": -1},  # attentional pooler (pruned)
    {"arch": "ViT-M-16-alt"},  # layer scale
    {"arch": "ViT-bigG-14", "layer": 3},  # mlp_ratio 4.9231, head_width 104
    {"arch": "ViT-SO400M-14-SigLIP-384", "layer": -1},  # timm trunks: so400m's MLP ratio, no class token
    {"arch": "ViT-B-16-SigLIP", "image_size": 256},  # position embeddings resampled by set_input_size
    {"arch": "ViT-L-16-SigLIP-384"}, {"arch": "ViT-gopt-16-SigLIP2-256", "layer": 1},
])
def test_declared_params_equal_the_built_tower_on_meta(options):
    opts = OpenClipOptions(**options)
    assert open_clip_tower.num_params(opts) == _numel(OpenClipTower(opts, device="meta").finish())


@pytest.mark.parametrize("extra", [
    {"ls_init_value": 0.1, "no_ln_pre": True, "mlp_ratio": 3.5, "head_width": 32},
    {"qk_norm": True, "scale_heads": True, "scale_attn_inner": True, "scale_attn": True, "scale_fc": True},
    {"scaled_cosine_attn": True, "norm_kwargs": {"eps": 1e-6}},
])
@pytest.mark.parametrize("layer", [0, -1])
def test_declared_params_follow_the_vision_cfg(tmp_path, extra, layer):
    """open_clip's own ViT with the options that change what a block holds, built and loaded for real."""
    config = {"embed_dim": 32, "vision_cfg": {**TINY_CONFIG_VISION, **extra}}
    path = tmp_path / "custom.json"
    path.write_text(json.dumps(config))
    opts = OpenClipOptions(arch=str(path), layer=layer)
    assert open_clip_tower.num_params(opts) == _numel(build(opts))



def test_declared_params_of_the_tiny_and_loaded_towers(tiny):
    assert open_clip_tower.num_params(OpenClipOptions(arch="tiny")) == _numel(build(OpenClipOptions(arch="tiny")))
    arch, weights, _ = tiny["vlbridge-test-vit"]
    opts = OpenClipOptions(arch=arch, pretrained=weights, image_size=84)
    assert open_clip_tower.num_params(opts) == _numel(build(opts))


def test_native_defaults_are_open_clips(tmp_path):
    from open_clip.model import CLIPVisionCfg

    defaults = CLIPVisionCfg()
    assert NATIVE_DEFAULTS == {key: getattr(defaults, key) for key in NATIVE_DEFAULTS}
    path = tmp_path / "bare.json"
    path.write_text(json.dumps({"vision_cfg": {"image_size": 224}}))  # every counted key left to open_clip's defaults
    opts = OpenClipOptions(arch=str(path))
    assert open_clip_tower.num_params(opts) == _numel(OpenClipTower(opts, device="meta").finish())


@pytest.mark.parametrize("vision_cfg", [
    {"timm_model_name": "eva02_base_patch16_clip_224", "image_size": 224},  # EVA02: SwiGLU, rope: layout not known from its name
    {"timm_model_name": "vit_large_patch14_clip_224", "image_size": 224},  # a pre_norm ViT: not counted
    {**TINY_CONFIG_VISION, "norm_kwargs": {"elementwise_affine": False}},  # norms without weights
    {**TINY_CONFIG_VISION, "some_future_key": 1},
])
def test_unknown_layouts_declare_no_count(tmp_path, vision_cfg):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"vision_cfg": vision_cfg}))
    assert open_clip_tower.num_params(OpenClipOptions(arch=str(path))) is None


def test_validate_prints_the_encoder_size(tmp_path):
    with using_registry(registry_for(open_clip_tower, "open-clip")):
        line = validated_encoder_line({"use": "open-clip", "options": {"arch": "ViT-B-16", "layer": -1}}, tmp_path)
    assert f"({open_clip_tower.num_params(OpenClipOptions(arch='ViT-B-16', layer=-1)):,}) frozen" in line and "?" not in line


def test_counting_imports_no_torch():
    script = ("from vlbridge.plugins.encoders import open_clip_tower as m\n"
              "for arch in ('ViT-B-16', 'ViT-SO400M-14-SigLIP', 'coca_ViT-B-32', 'tiny'):\n"
              "    assert m.num_params(m.OpenClipOptions(arch=arch)) > 0\n"
              "from vlbridge.cli.main import main\n"
              "assert main(['validate', 'qwen2.5-1.5b-siglip-qformer']) == 0")
    assert heavy_modules_after(script) == []
