"""Registration of `clip-vit-l`: CLIP ViT-L/14 through open_clip (declarations only, no torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from vlbridge.plugin.hookspecs import hookimpl
from vlbridge.plugin.sources import WeightSource, file_or_random
from vlbridge.plugins.encoders.open_clip_configs import is_weights_file, tag_source
from vlbridge.plugin.specs import CLIP_MEAN, CLIP_STD, EncoderSpec, Options, Precision, Preprocess, TokenShape

ARCH: dict[str, dict[str, int]] = {
    "l": {"width": 1024, "layers": 24, "heads": 16, "patch": 14, "embed_dim": 768, "image_size": 224},
    "tiny": {"width": 64, "layers": 2, "heads": 4, "patch": 14, "embed_dim": 32, "image_size": 56},
}
L_IMAGE_SIZES = (224, 336)  # the resolutions CLIP ViT-L/14 weights exist for
OPEN_CLIP_NAMES = {224: "ViT-L-14", 336: "ViT-L-14-336"}  # open_clip model configs of variant "l"
WEIGHTS_ACCEPTED = "a local open_clip checkpoint file (or a tag such as 'openai' where the hub is reachable)"


class ClipVitLOptions(Options):
    variant: Literal["l", "tiny"] = Field("l", description="'l' is CLIP ViT-L/14; 'tiny' is a small random-weight stand-in for tests")
    image_size: int | None = Field(None, description="224 or 336 for ViT-L/14 (default 224); any multiple of 14 for tiny")
    include_cls: bool = Field(True, description="keep the [CLS] token (BLIP-2 does; LLaVA drops it)")
    layer: int = Field(-2, description="which block's output to use, Python-style index: -1 last, -2 penultimate (LLaVA's and the default)")
    pretrained: str | None = Field(None, description="a local open_clip checkpoint file, or an open_clip tag such as 'openai' when online; none = random init")
    dtype: Precision = Field("fp32", description="compute dtype of the frozen encoder")
    quick_gelu: bool | None = Field(None, description="QuickGELU activations, which OpenAI's CLIP weights (LLaVA's tower) need; default: on for the 'openai' tag, off otherwise")

    @model_validator(mode="after")
    def _check(self) -> "ClipVitLOptions":
        arch = ARCH[self.variant]
        size = self.image_size
        if size is not None and self.variant == "l" and size not in L_IMAGE_SIZES:
            raise ValueError(f"image_size {size} has no CLIP ViT-L/14 weights; use one of {list(L_IMAGE_SIZES)}")
        if size is not None and size % arch["patch"]:
            raise ValueError(f"image_size {size} is not a multiple of the patch size {arch['patch']}")
        if not -arch["layers"] <= self.layer < arch["layers"]:
            raise ValueError(f"layer {self.layer} is out of range for {arch['layers']} blocks (use -{arch['layers']}..{arch['layers'] - 1})")
        return self

    @property
    def arch(self) -> dict[str, int]:
        return ARCH[self.variant]

    @property
    def resolved_image_size(self) -> int:
        return self.image_size or self.arch["image_size"]


def output(opts: ClipVitLOptions) -> TokenShape:
    grid = opts.resolved_image_size // opts.arch["patch"]
    return TokenShape(grid * grid + int(opts.include_cls), opts.arch["width"])


def preprocess(opts: ClipVitLOptions) -> Preprocess:
    return Preprocess(opts.resolved_image_size, CLIP_MEAN, CLIP_STD, "bicubic")


def open_clip_name(opts: ClipVitLOptions) -> str | None:
    """open_clip's model name for these options (None for the tiny variant, which has none)."""
    return OPEN_CLIP_NAMES[opts.resolved_image_size] if opts.variant == "l" else None


def weight_sources(opts: ClipVitLOptions, stage: int) -> list[WeightSource]:
    """`pretrained`: an open_clip tag of ViT-L/14 (its hub repo), else a local file; unset, only tiny may be random."""
    name = open_clip_name(opts)
    if opts.pretrained and name is not None and not is_weights_file(opts.pretrained):
        return [tag_source("pretrained", name, opts.pretrained, WEIGHTS_ACCEPTED)]
    return file_or_random("pretrained", opts.pretrained, WEIGHTS_ACCEPTED, random_by_design=opts.variant == "tiny")


def kept_blocks(opts: ClipVitLOptions) -> int:
    """Blocks up to and including `layer`; later ones (and ln_post, proj) are never run, so not built."""
    layers = opts.arch["layers"]
    return opts.layer + 1 if opts.layer >= 0 else layers + opts.layer + 1


def num_params(opts: ClipVitLOptions) -> int:
    a = opts.arch
    w = a["width"]
    grid = opts.resolved_image_size // a["patch"]
    stem = 3 * a["patch"] ** 2 * w + w + (grid * grid + 1) * w + 2 * w  # conv (no bias), class, positions, ln_pre
    return stem + kept_blocks(opts) * (12 * w * w + 13 * w)


@hookimpl
def vlbridge_register_encoders() -> list[EncoderSpec]:
    return [
        EncoderSpec(
            name="clip-vit-l",
            description="CLIP ViT-L/14 via open_clip: 1024 wide, 224 or 336 px, penultimate-layer tokens by default",
            factory="vlbridge.plugins.encoders.clip_vit_l_model:build",
            options=ClipVitLOptions,
            output=output,
            preprocess=preprocess,
            num_params=num_params,
            weight_sources=weight_sources,
        )
    ]
