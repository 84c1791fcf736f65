"""The `hf-vision` encoder on tiny random transformers towers saved with save_pretrained: tokens equal
to the library's own hidden_states (CLIP, SigLIP, DINOv2 with and without registers, ViT, and a
DeiT through `prefix_tokens`), declared shapes equal to built ones, preprocessing read from the
directory, strict loading, clear errors, and a stage-1 Q-Former that trains on its tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from tests.generic_encoders import heavy_modules_after, registry_for, stage1_losses, validated_encoder_line  # noqa: E402
from tests.hf_tiny import redraw  # noqa: E402
from vlbridge.errors import VLBridgeError, WeightsError  # noqa: E402
from vlbridge.plugins.encoders import hf_vision  # noqa: E402
from vlbridge.plugins.encoders.hf_vision import HFVisionOptions  # noqa: E402
from vlbridge.plugins.encoders.hf_vision_configs import KNOWN_TOWERS  # noqa: E402
from vlbridge.plugins.encoders.hf_vision_model import HFVisionEncoder, build  # noqa: E402
from vlbridge.plugin.specs import CLIP_MEAN, CLIP_STD, Preprocess, SizeEstimate, TokenShape  # noqa: E402
from vlbridge.plugintest.check import using_registry  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BLOCK = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99, max_position_embeddings=16)


def _towers() -> dict[str, tuple[object, object, int]]:
    """name -> (model to save, model class that loads it back for the reference, image size)."""
    t = transformers
    clip_vision = dict(BLOCK, image_size=28, patch_size=14)
    siglip_vision = dict(BLOCK, image_size=32, patch_size=16)
    return {
        "clip": (t.CLIPVisionModel(t.CLIPVisionConfig(**clip_vision)), t.CLIPVisionModel, 28),
        "clip-full": (t.CLIPModel(t.CLIPConfig(vision_config=clip_vision, text_config=TEXT, projection_dim=16)), t.CLIPVisionModel, 28),
        "siglip": (t.SiglipVisionModel(t.SiglipVisionConfig(**siglip_vision)), t.SiglipVisionModel, 32),
        "siglip-full": (t.SiglipModel(t.SiglipConfig(vision_config=siglip_vision, text_config=TEXT)), t.SiglipVisionModel, 32),
        "dinov2": (t.Dinov2Model(t.Dinov2Config(**BLOCK, image_size=28, patch_size=14)), t.Dinov2Model, 28),
        "dinov2-reg": (t.Dinov2WithRegistersModel(t.Dinov2WithRegistersConfig(**BLOCK, image_size=28, patch_size=14, num_register_tokens=2)),
                       t.Dinov2WithRegistersModel, 28),
        "dinov3": (t.DINOv3ViTModel(t.DINOv3ViTConfig(**BLOCK, image_size=28, patch_size=14, num_register_tokens=2)), t.DINOv3ViTModel, 28),
        "vit": (t.ViTModel(t.ViTConfig(**BLOCK, image_size=28, patch_size=14)), t.ViTModel, 28),
        "deit": (t.DeiTModel(t.DeiTConfig(**BLOCK, image_size=28, patch_size=14)), t.DeiTModel, 28),
    }




@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> dict[str, tuple[str, object, int]]:
    """name -> (directory, the reference model loaded back by transformers, image size)."""
    root = tmp_path_factory.mktemp("hf_vision")
    out = {}
    for seed, (name, (model, loader, size)) in enumerate(_towers().items()):
        redraw(model, std=0.1, seed=seed)
        model.save_pretrained(root / name)
        out[name] = (str(root / name), loader.from_pretrained(root / name).eval(), size)
    (root / "deit" / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 28, "width": 28}, "resample": 3, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    return out


def _pixels(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _hidden(reference, pixels: torch.Tensor, **kwargs):
    with torch.no_grad():
        return reference(pixel_values=pixels, output_hidden_states=True, **kwargs)


@pytest.mark.parametrize("name, options, select", [
    ("clip", {}, slice(None)),  # default: hidden_states[-2], [CLS] kept
    ("clip", {"layer": 0}, slice(None)),  # the embedding output
    ("clip", {"layer": 3, "include_cls": False}, slice(1, None)),
    ("clip-full", {"layer": -1, "include_cls": False}, slice(1, None)),
    ("siglip", {}, slice(None)),  # no [CLS]: include_cls changes nothing
    ("siglip-full", {"include_cls": False, "layer": 1}, slice(None)),
    ("dinov2", {"include_cls": False}, slice(1, None)),
    ("dinov2-reg", {"layer": -1}, [0, *range(3, 7)]),  # [CLS] + patches; the 2 registers dropped by default
    ("dinov2-reg", {"include_registers": True, "include_cls": False}, slice(1, None)),
    ("dinov3", {"layer": 1}, [0, *range(3, 7)]),  # DINOv3 as DINOv2 with registers; it needed prefix_tokens and kept them
    ("dinov3", {"include_registers": True, "include_cls": False}, slice(1, None)),
    ("vit", {"layer": 2}, slice(None)),
    ("deit", {"prefix_tokens": 2, "include_cls": False}, slice(2, None)),  # [CLS] + distillation token
])
def test_tokens_equal_transformers_hidden_states(towers, name, options, select):
    directory, reference, size = towers[name]
    opts = HFVisionOptions(model=directory, **options)
    encoder = build(opts)
    pixels = _pixels(size)
    with torch.no_grad():
        got = encoder(pixels)
    expected = _hidden(reference, pixels).hidden_states[opts.layer][:, select]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert tuple(got.shape[1:]) == (hf_vision.output(opts).num_tokens, 32) and encoder.output_shape == hf_vision.output(opts)


@pytest.mark.parametrize("options", [{}, {"prefix_tokens": 1}])  # a known family now; prefix_tokens was the only way in
def test_vit_mae_sees_every_patch_in_order(tmp_path, options):
    """ViTMAEModel's forward drops a random 75% of the patches (mask_ratio) and shuffles the rest: the
    tokens were 2 instead of 5, different at every call, and the contract check blamed the plugin."""
    model = transformers.ViTMAEModel(transformers.ViTMAEConfig(**BLOCK, image_size=28, patch_size=14))
    redraw(model, std=0.1, seed=3)
    model.save_pretrained(tmp_path)
    transformers.ViTImageProcessor(size={"height": 28, "width": 28}).save_pretrained(tmp_path)
    opts = HFVisionOptions(model=str(tmp_path), **options)
    encoder = build(opts)
    reference = transformers.ViTMAEModel.from_pretrained(tmp_path, mask_ratio=0.0).eval()
    pixels = _pixels(28)
    order = torch.arange(4.0).expand(2, -1)  # noise that sorts to the patches' own order
    with torch.no_grad():
        expected = reference(pixel_values=pixels, noise=order, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(encoder(pixels), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(encoder(pixels), expected, atol=1e-5, rtol=0)  # and again: nothing random
    assert hf_vision.output(opts) == TokenShape(5, 32) and hf_vision.num_params(opts) == _numel(encoder)


@pytest.mark.parametrize("name", ["siglip", "dinov2", "dinov3"])
def test_final_norm_on_the_last_layer_equals_last_hidden_state(towers, name):
    directory, reference, size = towers[name]
    encoder = build(HFVisionOptions(model=directory, layer=-1, final_norm=True, include_registers=True))
    pixels = _pixels(size)
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels), _hidden(reference, pixels).last_hidden_state, atol=1e-5, rtol=0)


def test_later_blocks_and_heads_are_removed(towers):
    encoder = build(HFVisionOptions(model=towers["siglip-full"][0], layer=1))
    assert len(encoder.vision.encoder.layers) == 1 and not hasattr(encoder.vision, "head")
    assert not any("text_model" in name for name, _ in encoder.named_parameters())
    whole = build(HFVisionOptions(model=towers["siglip-full"][0], layer=1, keep_all_layers=True))
    assert len(whole.vision.encoder.layers) == 3 and hasattr(whole.vision, "head")
    pixels = _pixels(32)
    with torch.no_grad():
        torch.testing.assert_close(whole(pixels), encoder(pixels), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["clip", "dinov2", "dinov3"])  # DINOv3: rotary positions, any grid
def test_another_resolution_interpolates_position_embeddings(towers, name):
    directory, reference, _ = towers[name]
    opts = HFVisionOptions(model=directory, image_size=42, include_registers=True)  # DINOv3's 2 registers, kept
    assert hf_vision.output(opts) == TokenShape(10 + 2 * (name == "dinov3"), 32) and hf_vision.preprocess(opts).image_size == 42
    pixels = _pixels(42)
    kwargs = {"interpolate_pos_encoding": True} if name == "clip" else {}
    with torch.no_grad():
        torch.testing.assert_close(build(opts)(pixels), _hidden(reference, pixels, **kwargs).hidden_states[-2], atol=1e-5, rtol=0)


def test_preprocessing_from_the_directory_or_the_family(towers, tmp_path):
    clip, siglip, dinov2 = (HFVisionOptions(model=towers[name][0]) for name in ("clip", "siglip", "dinov2"))
    assert hf_vision.preprocess(clip) == Preprocess(28, CLIP_MEAN, CLIP_STD, "bicubic", "shortest", crop_offset="floor")
    assert hf_vision.preprocess(siglip) == Preprocess(32, (0.5,) * 3, (0.5,) * 3, "bicubic", "squash", crop_offset="floor")
    assert hf_vision.preprocess(dinov2) == Preprocess(28, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", "shortest", 32, "floor")
    # What transformers' own image processors write, read back.
    directory = Path(towers["dinov2"][0])
    copy = tmp_path / "dinov2"
    copy.mkdir()
    (copy / "config.json").write_text((directory / "config.json").read_text())
    transformers.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}, resample=2,
                                   image_mean=[0.1, 0.2, 0.3], image_std=[0.3, 0.2, 0.1]).save_pretrained(copy)
    assert hf_vision.preprocess(HFVisionOptions(model=str(copy))) == Preprocess(28, (0.1, 0.2, 0.3), (0.3, 0.2, 0.1), "bilinear", "shortest", 32, "floor")
    transformers.SiglipImageProcessor(size={"height": 28, "width": 28}).save_pretrained(copy)
    assert hf_vision.preprocess(HFVisionOptions(model=str(copy))) == Preprocess(28, (0.5,) * 3, (0.5,) * 3, "bicubic", "squash", crop_offset="floor")
    (copy / "preprocessor_config.json").write_text(json.dumps(  # the old CLIPFeatureExtractor format: bare ints
        {"size": 28, "crop_size": 28, "do_center_crop": True, "resample": 3, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}))
    assert hf_vision.preprocess(HFVisionOptions(model=str(copy))) == Preprocess(28, CLIP_MEAN, CLIP_STD, "bicubic", "shortest", crop_offset="floor")
    (copy / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 28, "width": 28}, "resample": 1}))
    with pytest.raises(ValueError, match=r"resample=1 is not supported; vlbridge resizes bilinear \(2\) or bicubic \(3\)"):
        HFVisionOptions(model=str(copy))


@pytest.mark.parametrize("processor", [
    lambda t: t.CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}),
    lambda t: t.BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56},
                                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),  # DINOv2's
    lambda t: t.SiglipImageProcessor(size={"height": 56, "width": 56}),
])
@pytest.mark.parametrize("shape", [(90, 130), (90, 134)])  # 134 wide: an odd margin, where torchvision's crop rounds up
def test_the_eval_transform_matches_the_image_processor(processor, shape):
    """vlbridge's eval transform from the processor's own config gives its pixels (up to uint8 rounding),
    the centre crop included (transformers floors its offset)."""
    import numpy as np
    from PIL import Image

    from vlbridge.parts.images import to_pixel_batch
    from vlbridge.plugins.encoders.hf_vision_configs import processor_preprocess

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8))
    built = processor(transformers)
    ours = to_pixel_batch(image, processor_preprocess(built.to_dict(), "processor"))[0]
    theirs = torch.as_tensor(np.asarray(built(image, return_tensors="np")["pixel_values"][0]))
    assert ours.shape == theirs.shape == (3, 56, 56)
    assert (ours - theirs).abs().mean() < 1e-3 and (ours - theirs).abs().max() < 0.03


@pytest.mark.parametrize("rescale", [dict(rescale_factor=1 / 127.5), dict(do_rescale=False)])
def test_the_eval_transform_follows_the_processors_rescaling(rescale):
    """A processor that scales pixels by another rescale_factor (or not at all) was read as x / 255:
    its normalised pixels were off by the ratio, silently. One flat colour: no resampling differences."""
    import numpy as np
    from PIL import Image

    from vlbridge.parts.images import to_pixel_batch
    from vlbridge.plugins.encoders.hf_vision_configs import processor_preprocess

    image = Image.fromarray(np.full((40, 70, 3), (200, 40, 90), dtype=np.uint8))
    built = transformers.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, **rescale)
    ours = to_pixel_batch(image, processor_preprocess(built.to_dict(), "processor"))[0]
    theirs = torch.as_tensor(np.asarray(built(image, return_tensors="np")["pixel_values"][0]))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)


PAD_SHAPES = [(30, 41), (41, 30), (30, 44), (57, 20), (20, 20)]  # wide, tall (odd margins), wide (even), tall, square


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
@pytest.mark.parametrize("resize", [28, 32])  # 32: a centre crop of 28 after the resize
def test_the_eval_transform_pads_to_a_square_as_llava_image_processor(backend, resize):
    """LlavaImageProcessor(do_pad=True) pads the shorter side with int(image_mean * 255) (122, 116, 104 for
    CLIP's mean, where rounding would give 123), the image centred and an odd margin's extra pixel after it,
    then resizes and crops; vlbridge refused such processors. Equal pixels wherever both resize alike:
    uint8 tensors against transformers' torchvision backend, PIL images against its PIL backend."""
    import numpy as np
    from PIL import Image
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from vlbridge.parts.images import to_pixel_batch
    from vlbridge.plugins.encoders.hf_vision_configs import processor_preprocess

    cls = transformers.LlavaImageProcessor if backend == "torchvision" else LlavaImageProcessorPil
    built = cls(size={"shortest_edge": resize}, crop_size={"height": 28, "width": 28}, do_pad=True)
    preprocess = processor_preprocess(built.to_dict(), "processor")
    assert preprocess.pad_to_square == (122, 116, 104)
    for seed, shape in enumerate(PAD_SHAPES):
        array = np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)
        image = Image.fromarray(array) if backend == "pil" else torch.from_numpy(array).permute(2, 0, 1).contiguous()
        theirs = torch.as_tensor(np.asarray(built(image, return_tensors="np")["pixel_values"][0]))
        torch.testing.assert_close(to_pixel_batch(image, preprocess)[0], theirs, atol=1e-5, rtol=0)


def test_only_llavas_padding_is_followed():
    """Other image processors' do_pad pads the batch after cropping, which vlbridge does not do."""
    from vlbridge.plugins.encoders.hf_vision_configs import processor_preprocess

    clip = transformers.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).to_dict()
    with pytest.raises(ValueError, match="pads \\(do_pad true\\) as CLIPImageProcessor does; vlbridge follows only LlavaImageProcessor"):
        processor_preprocess({**clip, "do_pad": True}, "processor")
    llava = {**clip, "do_pad": True, "image_processor_type": "LlavaImageProcessor", "image_mean": [0.5, 0.2, 1.0]}
    assert processor_preprocess(llava, "processor").pad_to_square == (127, 51, 255)
    with pytest.raises(ValueError, match="pad_to_square must be None or an RGB colour, three whole numbers from 0 to 255"):
        Preprocess(28, CLIP_MEAN, CLIP_STD, pad_to_square=(0, 0, 256))


def test_known_towers_validate_offline():
    assert hf_vision.output(HFVisionOptions()) == TokenShape(577, 1024)  # LLaVA-1.5's CLIP ViT-L/14-336
    assert hf_vision.output(HFVisionOptions(variant="siglip-so400m")) == TokenShape(729, 1152)  # 384 px, 27 x 27 patches
    dinov2 = HFVisionOptions(variant="dinov2-large", include_cls=False)
    assert hf_vision.output(dinov2) == TokenShape(256, 1024)
    assert hf_vision.preprocess(dinov2) == Preprocess(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", "shortest", 256,
                                                      crop_offset="floor")  # as its BitImageProcessor crops


def test_option_errors(towers, tmp_path):
    with pytest.raises(ValueError, match="model directory not found"):
        HFVisionOptions(model=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="cannot read the config.json of 'someone/some-tower' offline"):
        HFVisionOptions(model="someone/some-tower")
    with pytest.raises(ValueError, match=r"layer 4 is out of range for hidden_states .* which has 3 blocks \(use -4..3; 0 is the embedding output\)"):
        HFVisionOptions(model=towers["clip"][0], layer=4)
    with pytest.raises(ValueError, match="image_size 30 is not a multiple of the patch size 14"):
        HFVisionOptions(model=towers["dinov2"][0], image_size=30)
    transformers.OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2).save_pretrained(tmp_path / "opt")
    with pytest.raises(ValueError, match="holds a 'opt' model; hf-vision knows the vision towers clip, siglip, clip_vision_model"):
        HFVisionOptions(model=str(tmp_path / "opt"))
    (tmp_path / "no_processor").mkdir()
    (tmp_path / "no_processor" / "config.json").write_text((Path(towers["deit"][0]) / "config.json").read_text())
    with pytest.raises(ValueError, match="has no preprocessor_config.json, and hf-vision has no default preprocessing for 'deit'"):
        HFVisionOptions(model=str(tmp_path / "no_processor"), prefix_tokens=2)


@pytest.mark.parametrize("config_class", ["ConvNextConfig", "SwinConfig"])
def test_towers_without_one_token_sequence_are_refused(tmp_path, config_class):
    """A CNN or a hierarchical tower has no single (tokens, width) hidden state. It was asked for
    prefix_tokens, which could not help, and then told it lacked hidden_size: now refused for what it is."""
    getattr(transformers, config_class)().save_pretrained(tmp_path)
    for extra in ({}, {"prefix_tokens": 0}):
        with pytest.raises(ValueError, match=r"Convolutional or hierarchical towers \(ConvNeXt, ResNet, Swin, Hiera\).* not supported"):
            HFVisionOptions(model=str(tmp_path), **extra)


def _copy_with(directory: str, target: Path, change) -> str:
    target.mkdir()
    for path in Path(directory).iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    state = load_file(target / "model.safetensors")
    change(state)
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    return str(target)


def test_strict_loading(towers, tmp_path):
    clip = towers["clip"][0]
    keys = list(load_file(Path(clip) / "model.safetensors"))
    prefix = next(k for k in keys if k.endswith("pre_layrnorm.bias")).removesuffix("pre_layrnorm.bias")  # transformers 4 wrote vision_model.
    missing = _copy_with(clip, tmp_path / "missing", lambda s: s.pop(f"{prefix}pre_layrnorm.bias"))
    with pytest.raises(WeightsError, match=r"1 missing: (vision_model\.)?pre_layrnorm\.bias"):
        build(HFVisionOptions(model=missing))
    extra = _copy_with(clip, tmp_path / "extra", lambda s: s.update({f"{prefix}encoder.layers.0.extra": torch.zeros(2)}))
    with pytest.raises(WeightsError, match=r"CLIPVisionModel weights .* do not match the model: 1 unexpected: (vision_model\.)?encoder\.layers\.0\.extra"):
        build(HFVisionOptions(model=extra))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text((Path(clip) / "config.json").read_text())
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(VLBridgeError, match="could not load the CLIPVisionModel tower from .*broken"):
        build(HFVisionOptions(model=str(tmp_path / "broken")))


def test_a_tower_saved_with_its_projection_loads_as_the_tower(tmp_path):
    """CLIPVisionModelWithProjection (an image_encoder folder): the projection is not on the hidden states' path."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    reference = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                               num_attention_heads=4, image_size=28, patch_size=14,
                                                               projection_dim=16)).eval()
    reference.save_pretrained(str(tmp_path / "image_encoder"))
    encoder = build(HFVisionOptions(model=str(tmp_path / "image_encoder"), layer=-1)).eval()
    pixels = _pixels(28)
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(encoder(pixels), expected)


def test_frozen_in_bf16_and_pixel_check(towers):
    directory, _, size = towers["clip"]
    encoder = build(HFVisionOptions(model=directory, dtype="bf16"))
    assert encoder.frozen and not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training and encoder(_pixels(size)).dtype == torch.bfloat16
    with pytest.raises(VLBridgeError, match=r"expects pixels shaped \(B, 3, 28, 28\)"):
        encoder(torch.zeros(1, 3, 56, 56))


def test_a_stage1_qformer_trains_on_it(towers):
    with using_registry(registry_for(hf_vision, "hf-vision")):
        before, after = stage1_losses({"use": "hf-vision", "options": {"model": towers["siglip"][0]}})
    assert before - after > 0.05, (before, after)


def test_declaring_imports_no_torch(towers):
    script = ("from vlbridge.plugins.encoders import hf_vision as m\n"
              f"for kw in ({{}}, {{'variant': 'tiny'}}, {{'variant': 'siglip-so400m'}}, {{'model': {towers['dinov2-reg'][0]!r}}}):\n"
              "    o = m.HFVisionOptions(**kw); m.output(o); m.preprocess(o)\n"
              "m.vlbridge_register_encoders()[0].check()")
    assert heavy_modules_after(script) == []


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("options", [{}, {"layer": 0}, {"layer": 1, "final_norm": True}, {"keep_all_layers": True}])
@pytest.mark.parametrize("name", ["clip", "clip-full", "siglip", "siglip-full", "dinov2", "dinov2-reg", "vit", "deit"])
def test_declared_params_equal_the_built_tower(towers, name, options):
    opts = HFVisionOptions(model=towers[name][0], **options, **({"prefix_tokens": 2} if name == "deit" else {}))
    assert hf_vision.num_params(opts) == _numel(build(opts))


@pytest.mark.parametrize("model_class, config", [
    ("Dinov2Model", dict(use_swiglu_ffn=True, qkv_bias=False, use_mask_token=False, mlp_ratio=3)),
    ("Dinov2WithRegistersModel", dict(use_swiglu_ffn=True, num_register_tokens=3)),
    ("SiglipVisionModel", dict(vision_use_head=False, num_channels=1)),
    ("ViTModel", dict(qkv_bias=False, pooler_output_size=24, num_channels=4)),
    ("DeiTModel", dict(qkv_bias=False, pooler_output_size=24)),
])
@pytest.mark.parametrize("keep_all_layers", [False, True])
def test_declared_params_follow_the_config_fields(tmp_path, model_class, config, keep_all_layers):
    """The fields that change what a tower holds (SwiGLU, q/k/v bias, mask token, registers, head, pooler, channels)."""
    model = getattr(transformers, model_class)(getattr(transformers, model_class.replace("Model", "Config"))(
        **BLOCK, image_size=28, patch_size=14, **config))
    model.config.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 28, "width": 28}, "resample": 3,
                                                                   "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    opts = HFVisionOptions(model=str(tmp_path), keep_all_layers=keep_all_layers, **({"prefix_tokens": 2} if "DeiT" in model_class else {}))
    assert hf_vision.num_params(opts) == _numel(HFVisionEncoder(model, opts))


@pytest.mark.parametrize("model_type, model_class", [
    ("clip_vision_model", "CLIPVisionModel"), ("siglip_vision_model", "SiglipVisionModel"), ("dinov2", "Dinov2Model"),
    ("dinov2_with_registers", "Dinov2WithRegistersModel"), ("vit", "ViTModel"), ("vit_mae", "ViTMAEModel"),
])
def test_a_config_that_omits_fields_counts_transformers_defaults(tmp_path, model_type, model_class):
    """transformers fills an omitted field from its config class; so must the count (and the token layout)."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    opts = HFVisionOptions(model=str(tmp_path), keep_all_layers=True)
    with torch.device("meta"):
        model = getattr(transformers, model_class)(getattr(transformers, model_class.replace("Model", "Config"))())
    encoder = HFVisionEncoder(model, opts)
    assert hf_vision.num_params(opts) == _numel(encoder)
    assert encoder.facts.patch == model.config.patch_size and encoder.facts.registers == getattr(model.config, "num_register_tokens", 0)


@pytest.mark.parametrize("variant, published", [("clip-l-336", 303.5e6), ("siglip-so400m", 428.2e6), ("dinov2-large", 304.4e6)])
def test_known_towers_declare_their_built_size(variant, published):
    """The offline table's towers, built on the meta device from the same fields: whole and cut after `layer`."""
    vision = dict(KNOWN_TOWERS[variant].config)
    vision = {k: v for k, v in vision.get("vision_config", vision).items() if k != "model_type"}
    model_class = {"clip-l-336": "CLIPVisionModel", "siglip-so400m": "SiglipVisionModel", "dinov2-large": "Dinov2Model"}[variant]
    for keep_all_layers in (True, False):
        opts = HFVisionOptions(variant=variant, keep_all_layers=keep_all_layers)
        with torch.device("meta"):
            model = getattr(transformers, model_class)(getattr(transformers, model_class.replace("Model", "Config"))(**vision))
        assert hf_vision.num_params(opts) == _numel(HFVisionEncoder(model, opts))
    assert hf_vision.num_params(HFVisionOptions(variant=variant, keep_all_layers=True)) == pytest.approx(published, rel=1e-3)


def test_unknown_families_declare_no_count_where_the_config_omits_a_size(towers, tmp_path):
    directory = tmp_path / "beit"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "beit", "hidden_size": 32, "num_hidden_layers": 2,
                                                       "image_size": 28, "patch_size": 14}))
    (directory / "preprocessor_config.json").write_text((Path(towers["deit"][0]) / "preprocessor_config.json").read_text())
    declared = hf_vision.num_params(HFVisionOptions(model=str(directory), prefix_tokens=1))  # intermediate_size: the class default
    assert isinstance(declared, SizeEstimate) and declared.count is None


def test_validate_prints_the_encoder_size(towers, tmp_path):
    opts = HFVisionOptions(model=towers["dinov2-reg"][0])
    with using_registry(registry_for(hf_vision, "hf-vision")):
        line = validated_encoder_line({"use": "hf-vision", "options": {"model": towers["dinov2-reg"][0]}}, tmp_path)
    assert f"({hf_vision.num_params(opts):,}) frozen" in line and "?" not in line


def test_counting_imports_no_torch(towers, tmp_path):
    (tmp_path / "a.yaml").write_text("name: a\nencoder: {use: hf-vision, options: {variant: siglip-so400m}}\nconnector: {use: qformer}\n")
    script = ("from vlbridge.plugins.encoders import hf_vision as m\n"
              f"for kw in ({{}}, {{'variant': 'dinov2-large'}}, {{'model': {towers['deit'][0]!r}, 'prefix_tokens': 2}}):\n"
              "    assert m.num_params(m.HFVisionOptions(**kw)) > 0\n"
              "from vlbridge.cli.main import main\n"
              f"assert main(['validate', {str(tmp_path / 'a.yaml')!r}]) == 0")
    assert heavy_modules_after(script) == []


def test_an_exported_clip_processor_refuses_a_torchvision_crop():
    """CLIPImageProcessor can only floor the crop's offset; a 'round' crop would go out one pixel off."""
    from vlbridge.errors import VLBridgeError
    from vlbridge.interop.hf_processor import llava_image_processor

    floor = llava_image_processor(Preprocess(28, CLIP_MEAN, CLIP_STD, "bicubic", "shortest", crop_offset="floor"))
    assert floor.crop_size == {"height": 28, "width": 28}
    with pytest.raises(VLBridgeError, match="one pixel apart"):
        llava_image_processor(Preprocess(28, CLIP_MEAN, CLIP_STD, "bicubic", "shortest", crop_offset="round"))
