"""Registration of `eva-vit-g`: BLIP-2's frozen EVA ViT-g/14 (declarations only, no torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from vlbridge import hookimpl
from vlbridge.specs import CLIP_MEAN, CLIP_STD, EncoderSpec, Options, Precision, Preprocess, TokenShape

# Architecture per variant. EVA-CLIP-g has 40 blocks; BLIP-2 keeps the first 39 (output of block 39).
ARCH: dict[str, dict[str, int]] = {
    "g": {"width": 1408, "depth": 40, "heads": 16, "mlp_hidden": 6144, "patch": 14, "blocks": 39, "image_size": 224},
    "tiny": {"width": 64, "depth": 2, "heads": 4, "mlp_hidden": 256, "patch": 14, "blocks": 2, "image_size": 56},
    # The synthetic world's encoder (vlbridge.world): trained contrastively on it, shipped, loaded by default.
    "world": {"width": 128, "depth": 4, "heads": 4, "mlp_hidden": 512, "patch": 8, "blocks": 4, "image_size": 64},
}


class EvaVitGOptions(Options):
    variant: Literal["g", "tiny", "world"] = Field("g", description="'g' is BLIP-2's ViT-g/14; 'tiny' is a small random-weight stand-in for tests; 'world' is the shipped encoder of the synthetic world (vlbridge.world), loaded unless pretrained is given")
    image_size: int | None = Field(None, ge=14, description="input resolution in pixels, a multiple of 14 (default 224; 364 for BLIP-2 captioning); position embeddings are interpolated")
    num_blocks: int | None = Field(None, ge=1, description="transformer blocks kept; BLIP-2 keeps 39 of 40 (default)")
    width: int | None = Field(None, ge=1, description="override the variant's width (e.g. for a converted checkpoint of another size)")
    depth: int | None = Field(None, ge=1, description="override the variant's total number of blocks")
    heads: int | None = Field(None, ge=1, description="override the variant's attention heads")
    mlp_hidden: int | None = Field(None, ge=1, description="override the variant's MLP width")
    patch_size: int | None = Field(None, ge=1, description="override the variant's patch size")
    layer_norm_eps: float = Field(1e-6, gt=0, description="LayerNorm epsilon inside the blocks")
    pretrained: str | None = Field(None, description="local weights: a transformers BLIP-2 directory, a LAVIS/EVA-CLIP .pth, or an OpenCLIP/timm EVA checkpoint; none = random init")
    dtype: Precision = Field("fp32", description="compute dtype of the frozen encoder")

    @model_validator(mode="after")
    def _check(self) -> "EvaVitGOptions":
        arch = self.arch
        if arch["width"] % arch["heads"]:
            raise ValueError(f"width {arch['width']} is not divisible by heads {arch['heads']}")
        if self.image_size is not None and self.image_size % arch["patch"]:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the patch size {arch['patch']} (try {self.image_size // arch['patch'] * arch['patch']})")
        if self.num_blocks is not None and self.num_blocks > arch["depth"]:
            raise ValueError(f"num_blocks {self.num_blocks} exceeds the {arch['depth']} blocks of variant {self.variant!r}")
        return self

    @property
    def arch(self) -> dict[str, int]:
        """The variant's architecture with any explicit overrides applied."""
        overrides = {"width": self.width, "depth": self.depth, "heads": self.heads, "mlp_hidden": self.mlp_hidden, "patch": self.patch_size}
        arch = {**ARCH[self.variant], **{k: v for k, v in overrides.items() if v is not None}}
        if self.depth is not None:  # keep the variant's habit: g drops its last block, tiny keeps all
            base = ARCH[self.variant]
            arch["blocks"] = max(1, self.depth - (base["depth"] - base["blocks"]))
        return arch

    @property
    def resolved_image_size(self) -> int:
        return self.image_size or self.arch["image_size"]

    @property
    def resolved_blocks(self) -> int:
        return self.num_blocks or self.arch["blocks"]


def output(opts: EvaVitGOptions) -> TokenShape:
    grid = opts.resolved_image_size // opts.arch["patch"]
    return TokenShape(grid * grid + 1, opts.arch["width"])  # patches + [CLS]


def preprocess(opts: EvaVitGOptions) -> Preprocess:
    return Preprocess(opts.resolved_image_size, CLIP_MEAN, CLIP_STD, "bicubic")


def num_params(opts: EvaVitGOptions) -> int:
    a, tokens = opts.arch, output(opts).num_tokens
    w, m = a["width"], a["mlp_hidden"]
    patch_embed = 3 * a["patch"] ** 2 * w + w
    block = 2 * w + (3 * w * w + 2 * w) + (w * w + w) + 2 * w + (w * m + m) + (m * w + w)  # q/v bias only
    return patch_embed + w + tokens * w + opts.resolved_blocks * block


@hookimpl
def vlbridge_register_encoders() -> list[EncoderSpec]:
    return [
        EncoderSpec(
            name="eva-vit-g",
            description="EVA ViT-g/14 as in BLIP-2: 1408 wide, 39 of 40 blocks, 257 tokens at 224 px",
            factory="vlbridge.plugins.encoders.eva_vit_g_model:build",
            options=EvaVitGOptions,
            output=output,
            preprocess=preprocess,
            num_params=num_params,
        )
    ]
