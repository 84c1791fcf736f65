"""open_clip model configs read without importing open_clip (or torch), for the `open-clip` encoder.

open_clip ships one JSON file per architecture in its package folder `model_configs/`; the folder is
found with `importlib.util.find_spec`, which locates the package without running it. From a config
this module derives what validation needs: the tower's width, depth, patch size, resolution and
how many tokens precede the patch tokens, plus the eval preprocessing open_clip would use.

Two kinds of tower yield a token sequence per block and are described here:
- open_clip's own `VisionTransformer` (`vision_cfg` with `width`, `layers`, `patch_size`): [CLS] +
  patches.
- a timm ViT trunk (`timm_model_name` such as SigLIP's `vit_so400m_patch14_siglip_224` or
  `eva02_base_patch16_clip_224`): its width and depth come from the size word of the name
  (`TIMM_VIT_SIZES`), patch and resolution from the name; SigLIP and `gap` trunks have no class
  token, others one, plus `regN` register tokens.
ResNets, ConvNeXt, Swin, FastViT and ViTamin trunks are refused: they change width from stage to
stage and yield a feature map, not one token sequence per block. Other timm ViT variants whose
layout the name does not tell (PE-Core, MobileCLIP's `vit_base_mci`, relpos) are refused too.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from vlbridge.plugin.sources import WeightSource, hub, local
from vlbridge.plugin.specs import CLIP_MEAN, CLIP_STD
from vlbridge.files.userfiles import read_json

# timm ViT size word -> (width, depth), as timm's model definitions have them.
TIMM_VIT_SIZES: dict[str, tuple[int, int]] = {
    "tiny": (192, 12), "small": (384, 12), "medium": (512, 12), "base": (768, 12), "large": (1024, 24),
    "so400m": (1152, 27), "huge": (1280, 32), "giant": (1408, 40), "giantopt": (1536, 40), "enormous": (1792, 64),
}
_TIMM_VIT = re.compile(r"^(?P<family>vit|eva02|eva)_(?P<size>[a-z0-9]+)_patch(?P<patch>\d+)(?:_(?P<tags>[a-z0-9_]+?))?_(?P<size_px>\d+)$")
_NOT_TOKENS = ("convnext", "swin", "fastvit", "vitamin", "resnet", "efficientnet", "regnet", "mobilenet")

# A small random-weight native ViT for tests and demos (no file, no download).
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 56, "layers": 2, "width": 64, "head_width": 16, "patch_size": 14},
}

# open_clip's preprocessing per family of pretrained weights (open_clip/pretrained.py's _pcfg,
# _slpcfg, _apcfg), chosen by the architecture name, then the few tags that differ from their family.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
OPENAI_PREPROCESS: dict[str, Any] = {"mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic", "resize_mode": "shortest"}
FAMILY_PREPROCESS: tuple[tuple[str, dict[str, Any]], ...] = (  # (substring of the lower-cased name, preprocessing)
    ("siglip", {"mean": HALF, "std": HALF, "interpolation": "bicubic", "resize_mode": "squash"}),
    ("clipa", {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear", "resize_mode": "squash"}),
)
TAG_PREPROCESS: dict[tuple[str | None, str], dict[str, Any]] = {  # (arch or None for any, tag) -> changes
    (None, "dfn5b"): {"resize_mode": "squash"},
    ("ViT-H-14-worldwide-378", "metaclip2_worldwide"): {"resize_mode": "squash"},
    ("ViT-bigG-14-worldwide-378", "metaclip2_worldwide"): {"resize_mode": "squash"},
    ("ViT-L-14", "laion2b_s32b_b82k"): {"mean": HALF, "std": HALF},
}


@dataclass(frozen=True)
class TowerFacts:
    """What the `open-clip` declarations need to know about a vision tower."""

    trunk: str  # "vit" (open_clip's VisionTransformer) or "timm"
    width: int
    depth: int  # blocks; for timm trunks taken from the size table, checked again once built
    patch: int
    image_size: int
    prefix_tokens: int  # [CLS] and register tokens before the patches
    timm_model_name: str | None = None


def config_folder() -> Path | None:
    """open_clip's `model_configs/` folder, located without importing open_clip; None if not installed."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "model_configs"


def known_archs() -> list[str]:
    folder = config_folder()
    return sorted(path.stem for path in folder.glob("*.json")) if folder is not None and folder.is_dir() else []


def is_config_file(arch: str) -> bool:
    """An `arch` naming a JSON file rather than one of open_clip's architectures."""
    return arch.endswith(".json") or arch.startswith(("/", "./", "../", "~"))


@lru_cache(maxsize=64)
def _read(path: str, mtime: float) -> dict[str, Any]:
    return read_json(path, "open_clip model config", top=dict)  # an InputFileError is a ValueError: an option error


def read_json_config(path: Path) -> dict[str, Any]:
    return _read(str(path.resolve()), path.stat().st_mtime)


def read_arch(arch: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model config, preprocess overrides) of `arch`: 'tiny', an open_clip name, or a JSON file (a model
    config, or the `open_clip_config.json` of an open_clip hub repository: model_cfg + preprocess_cfg)."""
    if arch == "tiny":
        return TINY_CONFIG, {}
    if arch.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"arch {arch!r}: open_clip's hub and local-dir schemas are not read here; pass the path of the "
                         "repository's open_clip_config.json as arch and its weights file as pretrained")
    if is_config_file(arch):
        path = Path(arch).expanduser()
        if not path.is_file():
            raise ValueError(f"open_clip config file not found: {arch}")
        data = read_json_config(path)
        if isinstance(data.get("model_cfg"), dict):
            return data["model_cfg"], dict(data.get("preprocess_cfg") or {})
        return data, dict(data.get("preprocess_cfg") or {})
    folder = config_folder()
    if folder is None:
        raise ValueError("open_clip is not installed (pip install open_clip_torch); the open-clip encoder reads its model configs")
    path = folder / f"{arch}.json"
    if not path.is_file():
        close = difflib.get_close_matches(arch, known_archs(), n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise ValueError(f"{arch!r} is not an open_clip architecture (no {arch}.json in {folder}){hint}; give one of "
                         "open_clip's names (open_clip.list_models()) or the path of a model config JSON file")
    return read_json_config(path), {}


def vision_cfg_of(config: dict[str, Any], arch: str) -> dict[str, Any]:
    vision = config.get("vision_cfg")
    if not isinstance(vision, dict):
        raise ValueError(f"{arch}: the model config has no 'vision_cfg' object")
    return vision


def describe_tower(config: dict[str, Any], arch: str) -> TowerFacts:
    """The token layout of the config's vision tower, or ValueError saying why it yields no token sequence."""
    vision = vision_cfg_of(config, arch)
    image_size = _square(vision.get("image_size", 224), arch)
    timm_name = vision.get("timm_model_name")
    if timm_name:
        return _describe_timm(str(timm_name), image_size, arch)
    layers = vision.get("layers", 12)
    if isinstance(layers, (list, tuple)):
        raise ValueError(f"{arch} is a ResNet (open_clip's ModifiedResNet, layers {list(layers)}): a convolutional trunk "
                         "yields a feature map per stage, not a token sequence per block; use a ViT architecture")
    patch = vision.get("patch_size", 16)
    width = vision.get("width", 768)
    if not all(isinstance(v, int) and v > 0 for v in (layers, patch, width)):
        raise ValueError(f"{arch}: vision_cfg needs positive integer layers, width and patch_size, got {layers!r}, {width!r}, {patch!r}")
    return TowerFacts("vit", width=width, depth=layers, patch=patch, image_size=image_size, prefix_tokens=1)


def _describe_timm(name: str, image_size: int, arch: str) -> TowerFacts:
    match = _TIMM_VIT.match(name)
    if match is None:
        family = next((word for word in _NOT_TOKENS if word in name), None)
        why = (f"a {family} trunk changes width from stage to stage and yields a feature map, not one token sequence per block"
               if family else "its token layout is not known from its name (vlbridge reads vit_/eva_/eva02_<size>_patch<P>_..._<px> ViTs)")
        raise ValueError(f"{arch}: timm trunk {name!r} is not supported: {why}")
    size = match["size"]
    if size not in TIMM_VIT_SIZES:
        raise ValueError(f"{arch}: unknown ViT size {size!r} in timm trunk {name!r}; widths are known for {', '.join(TIMM_VIT_SIZES)}")
    if int(match["size_px"]) != image_size:
        raise ValueError(f"{arch}: timm trunk {name!r} is built for {match['size_px']} px but vision_cfg says image_size {image_size}")
    tags = (match["tags"] or "").split("_")
    cls = 0 if match["family"] == "vit" and ("siglip" in tags or "gap" in tags) else 1
    registers = sum(int(tag[3:]) for tag in tags if re.fullmatch(r"reg\d+", tag))
    width, depth = TIMM_VIT_SIZES[size]
    return TowerFacts("timm", width=width, depth=depth, patch=int(match["patch"]), image_size=image_size,
                      prefix_tokens=cls + registers, timm_model_name=name)


def _square(size: Any, arch: str) -> int:
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"{arch}: image_size {list(size)} is not square; vlbridge's encoders take square images")
        size = size[0]
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"{arch}: image_size must be a positive integer, got {size!r}")
    return size


def preprocessing(arch: str, tag: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """mean, std, interpolation and resize_mode open_clip uses for `arch` with pretrained `tag`:
    the family's (by name), the tag's changes, then a config file's own `preprocess_cfg`."""
    name = Path(arch).stem if is_config_file(arch) else arch
    chosen = dict(next((pre for word, pre in FAMILY_PREPROCESS if word in name.lower()), OPENAI_PREPROCESS))
    if tag is not None:
        chosen.update(TAG_PREPROCESS.get((None, tag), {}))
        chosen.update(TAG_PREPROCESS.get((name, tag), {}))
    chosen.update({key: overrides[key] for key in ("mean", "std", "interpolation", "resize_mode") if key in overrides})
    for key in ("mean", "std"):
        value = chosen[key]
        value = (value,) * 3 if isinstance(value, (int, float)) else tuple(value)
        if len(value) != 3:
            raise ValueError(f"{arch}: preprocess {key} must have 3 values (RGB), got {list(value)}")
        chosen[key] = tuple(float(v) for v in value)
    if chosen["interpolation"] not in ("bicubic", "bilinear"):
        raise ValueError(f"{arch}: interpolation {chosen['interpolation']!r} is not supported; vlbridge resizes bicubic or bilinear")
    if chosen["resize_mode"] not in ("shortest", "squash"):
        raise ValueError(f"{arch}: resize_mode {chosen['resize_mode']!r} is not supported; vlbridge resizes 'shortest' "
                         "(then centre-crops) or 'squash'")
    return chosen


WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # what a tag's hub repo holds


def is_weights_file(pretrained: str) -> bool:
    """A `pretrained` naming a local file rather than an open_clip tag such as 'openai'."""
    return (pretrained.endswith(WEIGHT_SUFFIXES) or "/" in pretrained or pretrained.startswith("~")
            or Path(pretrained).expanduser().exists())


def tag_source(option: str, arch: str, tag: str, accepts: str) -> WeightSource:
    """Where open_clip downloads ARCH's pretrained TAG from: its Hugging Face hub repository. A tag
    open_clip does not know for `arch` is then only a path that does not exist, and said so.

    Imports open_clip (and torch): only called just before such a tower is built, never to validate."""
    import open_clip

    repo = str((open_clip.get_pretrained_cfg(arch, tag) or {}).get("hf_hub") or "").rstrip("/")
    if not repo:
        return local(option, tag, accepts)
    return hub(option, repo, accepts, files=OPEN_CLIP_FILES, label=f"open_clip weights {arch + '/' + tag!r}")
