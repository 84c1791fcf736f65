"""transformers vision towers described without torch, for the `hf-vision` encoder.

A tower's `config.json` (and `preprocessor_config.json`) are read from a local save_pretrained
directory, else from the Hugging Face cache's copy of a hub id, else from `KNOWN_TOWERS` (a few
popular towers, so the default validates offline). Dual-tower configs (`clip`, `siglip`) nest the
vision tower under `vision_config`. `FAMILIES` says, per vision `model_type`, how many tokens come
before the patches, which module is the final norm, and the preprocessing to assume when a
directory has no `preprocessor_config.json`. Other model types work when the user says how many
prefix tokens they have and the directory has a preprocessor_config.json.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Callable

from vlbridge.files.hf_config import cached_hub_file, local_config, looks_local, read_local_json
from vlbridge.plugin.specs import CLIP_MEAN, CLIP_STD, Preprocess
from vlbridge.files.userfiles import read_json

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's codes, as image processors store them
DUAL_TOWERS = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}  # model_type -> its vision part's


@dataclass(frozen=True)
class Family:
    """What vlbridge knows about one vision model_type."""

    cls_tokens: int  # class tokens before the patches (registers are counted from the config)
    final_norm: str  # attribute of the vision module applied to last_hidden_state (or the pooled token)
    defaults: dict[str, Any]  # config.json defaults for keys an old config may omit: the config class's own
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    resize_mode: str
    crop_fraction: float = 1.0  # image_size / resized shorter side, without a preprocessor_config.json
    masks_patches: bool = False  # the forward drops a random config.mask_ratio of the patches (ViT-MAE's pre-training)
    registers: bool = False  # config.num_register_tokens register tokens follow the class token
    any_resolution: bool = False  # position embeddings fit any grid without being asked (DINOv2 interpolates, DINOv3 is RoPE)


# transformers' config class defaults (CLIPVisionConfig, SiglipVisionConfig, Dinov2Config, ...): the
# shape keys, and those the parameter counts read (hf_vision_params); tests compare them with the classes.
_VIT_DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "image_size": 224, "patch_size": 16, "num_channels": 3}
_MLP_DEFAULTS = {"intermediate_size": 3072}
_DINOV2_DEFAULTS = {**_VIT_DEFAULTS, "mlp_ratio": 4, "qkv_bias": True, "use_swiglu_ffn": False}
FAMILIES: dict[str, Family] = {
    "clip_vision_model": Family(1, "post_layernorm", {**_VIT_DEFAULTS, **_MLP_DEFAULTS, "patch_size": 32}, CLIP_MEAN, CLIP_STD,
                                "bicubic", "shortest"),
    "siglip_vision_model": Family(0, "post_layernorm", {**_VIT_DEFAULTS, **_MLP_DEFAULTS, "vision_use_head": True}, HALF, HALF,
                                  "bicubic", "squash"),
    "dinov2": Family(1, "layernorm", {**_DINOV2_DEFAULTS, "patch_size": 14, "use_mask_token": True}, IMAGENET_MEAN, IMAGENET_STD,
                     "bicubic", "shortest", 224 / 256, any_resolution=True),
    "dinov2_with_registers": Family(1, "layernorm", {**_DINOV2_DEFAULTS, "num_register_tokens": 4},
                                    IMAGENET_MEAN, IMAGENET_STD, "bicubic", "shortest", 224 / 256, registers=True, any_resolution=True),
    "dinov3_vit": Family(1, "norm", {**_VIT_DEFAULTS, "hidden_size": 384, "num_register_tokens": 0}, IMAGENET_MEAN, IMAGENET_STD,
                         "bilinear", "squash", registers=True, any_resolution=True),  # DINOv3ViTImageProcessor's defaults
    "vit": Family(1, "layernorm", {**_VIT_DEFAULTS, **_MLP_DEFAULTS, "qkv_bias": True}, HALF, HALF, "bilinear", "squash"),
    "vit_mae": Family(1, "layernorm", {**_VIT_DEFAULTS, **_MLP_DEFAULTS, "qkv_bias": True}, HALF, HALF, "bilinear", "squash",
                      masks_patches=True),  # ViTImageProcessor's defaults, as for ViT
}


@dataclass(frozen=True)
class KnownTower:
    """A popular hub tower's config facts, so that validation needs neither the network nor a cache."""

    hub_id: str
    config: dict[str, Any]
    processor: dict[str, Any] | None


KNOWN_TOWERS: dict[str, KnownTower] = {
    "clip-l-336": KnownTower("openai/clip-vit-large-patch14-336", {
        "model_type": "clip", "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                                                "num_attention_heads": 16, "image_size": 336, "patch_size": 14}},
        {"size": 336, "crop_size": 336, "do_center_crop": True, "resample": 3, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}),
    "siglip-so400m": KnownTower("google/siglip-so400m-patch14-384", {
        "model_type": "siglip", "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                                                  "num_attention_heads": 16, "image_size": 384, "patch_size": 14}},
        {"size": {"height": 384, "width": 384}, "resample": 3, "image_mean": list(HALF), "image_std": list(HALF)}),
    "dinov2-large": KnownTower("facebook/dinov2-large", {
        "model_type": "dinov2", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 518, "patch_size": 14,
        "mlp_ratio": 4, "qkv_bias": True, "use_swiglu_ffn": False},
        {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "resample": 3,
         "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)}),
}
# The `tiny` variant: a small random-weight CLIP vision tower built from this config (no download).
TINY_CONFIG: dict[str, Any] = {"model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 128,
                               "num_attention_heads": 4, "num_hidden_layers": 2, "image_size": 56, "patch_size": 14}


@dataclass(frozen=True)
class TowerFacts:
    """The vision tower's token layout, read from its config."""

    model_type: str  # of the vision tower itself (clip_vision_model for a full CLIP directory)
    dual: bool  # the directory holds a dual-tower model; its other tower's weights are not ours
    width: int
    layers: int
    patch: int
    image_size: int  # the position embeddings' resolution
    cls_tokens: int
    registers: int


def _cached_hub_file(hub_id: str, name: str) -> dict[str, Any] | None:
    """The hub file as the Hugging Face cache holds it (no network), or None."""
    found = cached_hub_file(hub_id, name)
    return None if found is None else _read(str(found), found.stat().st_mtime)


@lru_cache(maxsize=32)
def _read(path: str, mtime: float) -> dict[str, Any]:
    return read_json(path, "hub config", top=dict)


def read_source(model: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(config.json, preprocessor_config.json or None) of a local directory or a hub id, without torch
    or network; ValueError (an option error) when they cannot be read."""
    if looks_local(model):
        config = local_config(model)  # ValueError for a missing directory or config.json
        assert config is not None
        return config, image_processor_config(lambda name: read_local_json(model, name))
    config = _cached_hub_file(model, "config.json")
    if config is not None:
        return config, image_processor_config(lambda name: _cached_hub_file(model, name))
    known = next((tower for tower in KNOWN_TOWERS.values() if tower.hub_id == model), None)
    if known is not None:
        return known.config, known.processor
    raise ValueError(f"cannot read the config.json of {model!r} offline: it is not a local directory, the Hugging Face cache "
                     f"has no copy of it, and hf-vision knows only {', '.join(t.hub_id for t in KNOWN_TOWERS.values())}; "
                     "give a directory written by save_pretrained, or fetch the configs once where the hub is reachable "
                     f"(`huggingface-cli download {model} config.json preprocessor_config.json`)")


def image_processor_config(read: Callable[[str], dict[str, Any] | None]) -> dict[str, Any] | None:
    """The image processor's settings: preprocessor_config.json, else the `image_processor` entry of
    processor_config.json (where a transformers 5 processor's save_pretrained keeps them, writing no
    preprocessor_config.json); None when neither holds them."""
    found = read("preprocessor_config.json")
    if found is not None:
        return found
    nested = (read("processor_config.json") or {}).get("image_processor")
    return nested if isinstance(nested, dict) else None


def vision_values(config: dict[str, Any]) -> tuple[str, bool, dict[str, Any]]:
    """(vision model_type, dual?, the vision tower's config with its family's defaults filled in), as
    transformers fills them: a dual-tower config's vision half is its `vision_config`."""
    model_type = config.get("model_type")
    dual = model_type in DUAL_TOWERS
    if dual:
        vision = config.get("vision_config") or {}
        model_type = vision.get("model_type", DUAL_TOWERS[str(config["model_type"])])
        config = vision
    family = FAMILIES.get(str(model_type))
    return str(model_type), dual, {**(family.defaults if family else {}), **config}


def describe_tower(config: dict[str, Any], where: str, prefix_tokens: int | None) -> TowerFacts:
    """The vision tower's layout; ValueError for a model that is not a vision tower vlbridge can read."""
    model_type, dual, values = vision_values(config)
    family = FAMILIES.get(model_type)
    missing = [key for key in ("hidden_size", "num_hidden_layers", "image_size", "patch_size")
               if not isinstance(values.get(key), int) or isinstance(values.get(key), bool)]
    if family is None and (prefix_tokens is None or missing):
        known = f"{where} holds a {model_type!r} model; hf-vision knows the vision towers {', '.join([*DUAL_TOWERS, *FAMILIES])}. "
        if missing:  # prefix_tokens would not help
            raise ValueError(known + f"Its config.json lacks integer {', '.join(missing)}: it is no ViT-like tower, whose "
                             "hidden_states are (batch, tokens, width) on one fixed patch grid. Convolutional or hierarchical towers "
                             "(ConvNeXt, ResNet, Swin, Hiera) and variable-resolution ones (SigLIP 2 NaFlex) are not supported; "
                             "use a ViT-like tower, or write an encoder plugin for it")
        raise ValueError(known + "For another ViT-like tower whose forward returns hidden_states, set prefix_tokens "
                         "(how many tokens come before the patch tokens)")
    if missing:
        raise ValueError(f"{where}: config.json lacks integer {', '.join(missing)}; hf-vision reads ViT-like towers")
    cls_tokens = family.cls_tokens if prefix_tokens is None else prefix_tokens
    registers = int(values.get("num_register_tokens", 0)) if family is not None and family.registers and prefix_tokens is None else 0
    return TowerFacts(str(model_type), dual, values["hidden_size"], values["num_hidden_layers"], values["patch_size"],
                      values["image_size"], cls_tokens, registers)


def processor_preprocess(processor: dict[str, Any], where: str) -> Preprocess:
    """A `preprocessor_config.json` as vlbridge's Preprocess; ValueError for what the eval transform cannot do."""
    if processor.get("do_resize", True) is False:
        raise ValueError(f"{where}: the image processor does not resize (do_resize false); vlbridge needs a fixed square input")
    pad = _square_fill(processor, where)
    crop = bool(processor.get("do_center_crop", False))
    mode, target = _resize(processor.get("size"), crop, where)
    size = _square(processor.get("crop_size"), where, "crop_size") if crop else target
    if not crop and mode == "shortest":
        raise ValueError(f"{where}: the image processor resizes the shorter side without a centre crop, so images would not be square")
    resample = processor.get("resample", 3)
    if resample not in RESAMPLE:
        raise ValueError(f"{where}: resample={resample!r} is not supported; vlbridge resizes bilinear (2) or bicubic (3)")
    if processor.get("do_normalize", True) is False:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    else:
        mean, std = _rgb(processor.get("image_mean"), where, "image_mean"), _rgb(processor.get("image_std"), where, "image_std")
    mean, std = _rescaled_normalisation(processor, mean, std, where)
    if target < size:
        raise ValueError(f"{where}: the image processor resizes to {target} but crops {size}")
    return Preprocess(size, mean, std, RESAMPLE[resample], mode, target if target != size else None, crop_offset="floor",
                      pad_to_square=pad)


def _square_fill(processor: dict[str, Any], where: str) -> tuple[int, int, int] | None:
    """The colour a LlavaImageProcessor with do_pad pads each image to a square with, before it resizes
    (LLaVA-1.5's 'pad'): image_mean in 8-bit levels, truncated as transformers computes it (int(m * 255));
    None without do_pad. Other processors' do_pad pads the batch after cropping, which vlbridge does not do."""
    if processor.get("do_pad", False) is not True:
        return None
    kind = str(processor.get("image_processor_type", ""))
    if not kind.startswith("LlavaImageProcessor"):
        raise ValueError(f"{where}: the image processor pads (do_pad true) as {kind or 'an unnamed image processor'} does; "
                         "vlbridge follows only LlavaImageProcessor's padding to a square before the resize. Save the "
                         "processor with do_pad false, or as a LlavaImageProcessor if it pads to a square")
    mean = _rgb(processor.get("image_mean", list(CLIP_MEAN)), where, "image_mean")  # LlavaImageProcessor's default
    return (int(mean[0] * 255), int(mean[1] * 255), int(mean[2] * 255))


def _rescaled_normalisation(processor: dict[str, Any], mean: tuple[float, float, float], std: tuple[float, float, float],
                            where: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(mean, std) that applied to pixels / 255 (vlbridge's scaling) give what the processor computes from
    pixels * rescale_factor (or raw 0..255 pixels with do_rescale false): (x*k/255 - m)/s = (x/255 - m/k)/(s/k)."""
    factor = processor.get("rescale_factor", 1 / 255) if processor.get("do_rescale", True) is not False else 1.0
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
        raise ValueError(f"{where}: image processor rescale_factor must be a positive number, got {factor!r}")
    scale = factor * 255
    if abs(scale - 1) < 1e-9:
        return mean, std
    return (mean[0] / scale, mean[1] / scale, mean[2] / scale), (std[0] / scale, std[1] / scale, std[2] / scale)


def _resize(size: Any, crop: bool, where: str) -> tuple[str, int]:
    """(resize mode, target) of a processor's `size`: a bare int is the shorter side when a crop follows
    (CLIP's old feature extractors), else both sides (ViT's)."""
    if isinstance(size, int) and not isinstance(size, bool):
        return ("shortest" if crop else "squash"), size
    if isinstance(size, dict) and isinstance(size.get("shortest_edge"), int):
        return "shortest", size["shortest_edge"]
    if isinstance(size, dict) and "height" in size and "width" in size:
        return "squash", _square(size, where, "size")
    raise ValueError(f"{where}: image processor size {size!r} is not supported; expected an int, "
                     "{'shortest_edge': N} or a square {'height': N, 'width': N}")


def _square(value: Any, where: str, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, dict) and value.get("height") == value.get("width") and isinstance(value.get("height"), int):
        return value["height"]
    raise ValueError(f"{where}: image processor {key} {value!r} is not a square size; vlbridge's encoders take square images")


def _rgb(value: Any, where: str, key: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        value = [value] * 3
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"{where}: image processor {key} must be 3 numbers (RGB), got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


def family_preprocess(facts: TowerFacts, where: str) -> Preprocess:
    """The family's processor defaults at the config's image_size, for a directory without preprocessor_config.json."""
    family = FAMILIES.get(facts.model_type)
    if family is None:
        raise ValueError(f"{where} has no preprocessor_config.json, and hf-vision has no default preprocessing for "
                         f"{facts.model_type!r} towers; save the image processor next to the model (processor.save_pretrained)")
    size = facts.image_size
    target = round(size / family.crop_fraction) if family.resize_mode == "shortest" else size
    return Preprocess(size, family.mean, family.std, family.interpolation, family.resize_mode, target if target != size else None,
                      crop_offset="floor")  # transformers' processors


def rescaled(preprocess: Preprocess, image_size: int) -> Preprocess:
    """The same transform at another crop size; the resize target scales with it."""
    if image_size == preprocess.image_size:
        return preprocess
    target = None if preprocess.resize_size is None else round(preprocess.resize_size * image_size / preprocess.image_size)
    return replace(preprocess, image_size=image_size, resize_size=target if target != image_size else None)
