"""Registration of `eva-vit-g`: BLIP-2's frozen EVA ViT-g/14 (declarations only, no torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from vlbridge.plugin.hookspecs import hookimpl
from vlbridge.plugin.sources import WeightSource, file_or_random
from vlbridge.files.hf_config import read_local_json
from vlbridge.plugin.specs import CLIP_MEAN, CLIP_STD, EncoderSpec, Options, Precision, Preprocess, TokenShape

# Architecture per variant. EVA-CLIP-g has 40 blocks; BLIP-2 keeps the first 39 (output of block 39).
ARCH: dict[str, dict[str, int]] = {
    "g": {"width": 1408, "depth": 40, "heads": 16, "mlp_hidden": 6144, "patch": 14, "blocks": 39, "image_size": 224},
    "tiny": {"width": 64, "depth": 2, "heads": 4, "mlp_hidden": 256, "patch": 14, "blocks": 2, "image_size": 56},
}
# A vlbridge encoder directory: config.json (this model_type and the option names below) beside
# model.safetensors, as `python -m vlbridge.world.train_parts` writes the world's encoder.
DIRECTORY_MODEL_TYPE = "eva-vit"
DIRECTORY_FIELDS: dict[str, str] = {"width": "width", "depth": "depth", "heads": "heads", "mlp_hidden": "mlp_hidden",
                                    "patch_size": "patch", "num_blocks": "blocks", "image_size": "image_size"}


def directory_arch(pretrained: str | None) -> dict[str, int] | None:
    """The architecture a vlbridge encoder directory declares in its config.json (None for any other
    source); read without torch, so an assembly using it validates before anything loads."""
    config = read_local_json(pretrained, "config.json") if pretrained else None
    if config is None or config.get("model_type") != DIRECTORY_MODEL_TYPE:
        return None
    missing = [name for name in DIRECTORY_FIELDS if not isinstance(config.get(name), int)]
    if missing:
        raise ValueError(f"{pretrained}/config.json lacks integer fields {missing} (an '{DIRECTORY_MODEL_TYPE}' encoder "
                         f"directory states {list(DIRECTORY_FIELDS)})")
    return {ours: config[name] for name, ours in DIRECTORY_FIELDS.items()}


BLIP2_MODEL_TYPES = ("blip-2", "blip_2_vision_model")  # what eva_vit_g_convert reads a vision tower from


def blip2_directory_problems(pretrained: str | None, heads: int, eps: float) -> list[str]:
    """How the vision config of a transformers BLIP-2 directory (the fields it states) disagrees with
    the options where tensor shapes cannot tell (heads, LayerNorm epsilon); empty for any other source."""
    config = read_local_json(pretrained, "config.json") if pretrained else None
    if config is None or config.get("model_type") not in BLIP2_MODEL_TYPES:
        return []
    vision = (config.get("vision_config") or {}) if config.get("model_type") == "blip-2" else config
    theirs_heads, theirs_eps = vision.get("num_attention_heads"), vision.get("layer_norm_eps")  # what it states
    problems = []
    if theirs_heads is not None and theirs_heads != heads:
        problems.append(f"has {theirs_heads} attention heads, not {heads} (set heads: {theirs_heads})")
    if theirs_eps is not None and theirs_eps != eps:
        problems.append(f"runs its LayerNorms with epsilon {theirs_eps:g}, not {eps:g} (set layer_norm_eps: {theirs_eps:g})")
    return problems


class EvaVitGOptions(Options):
    variant: Literal["g", "tiny"] = Field("g", description="'g' is BLIP-2's ViT-g/14; 'tiny' is a small random-weight stand-in for tests (a pretrained encoder directory's config.json replaces either)")
    image_size: int | None = Field(None, ge=14, description="input resolution in pixels, a multiple of 14 (default 224; 364 for BLIP-2 captioning); position embeddings are interpolated")
    num_blocks: int | None = Field(None, ge=1, description="transformer blocks kept; BLIP-2 keeps 39 of 40 (default)")
    width: int | None = Field(None, ge=1, description="override the variant's width (e.g. for a converted checkpoint of another size)")
    depth: int | None = Field(None, ge=1, description="override the variant's total number of blocks")
    heads: int | None = Field(None, ge=1, description="override the variant's attention heads")
    mlp_hidden: int | None = Field(None, ge=1, description="override the variant's MLP width")
    patch_size: int | None = Field(None, ge=1, description="override the variant's patch size")
    layer_norm_eps: float = Field(1e-6, gt=0, description="LayerNorm epsilon inside the blocks")
    pretrained: str | None = Field(None, description="local weights: a vlbridge encoder directory (config.json with model_type 'eva-vit' + model.safetensors; its config decides the architecture), a transformers BLIP-2 directory, a LAVIS/EVA-CLIP .pth, or an OpenCLIP/timm EVA checkpoint; none = random init")
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
        problems = blip2_directory_problems(self.pretrained, arch["heads"], self.layer_norm_eps)
        if problems:
            raise ValueError(f"pretrained {self.pretrained} is a transformers BLIP-2 directory whose vision tower "
                             f"{'; '.join(problems)}: its tensors would load and compute something else")
        return self

    @property
    def base_arch(self) -> dict[str, int]:
        """What the weights' own directory declares, else the variant's."""
        return directory_arch(self.pretrained) or ARCH[self.variant]

    @property
    def arch(self) -> dict[str, int]:
        """The base architecture with any explicit overrides applied."""
        base = self.base_arch
        overrides = {"width": self.width, "depth": self.depth, "heads": self.heads, "mlp_hidden": self.mlp_hidden, "patch": self.patch_size}
        arch = {**base, **{k: v for k, v in overrides.items() if v is not None}}
        if self.depth is not None:  # keep the base's habit: g drops its last block, tiny keeps all
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


def weight_sources(opts: EvaVitGOptions, stage: int) -> list[WeightSource]:
    """The `pretrained` file or directory; unset, the tiny variant is random by design, ViT-g is not."""
    return file_or_random("pretrained", opts.pretrained, "a vlbridge encoder directory, a transformers BLIP-2 directory "
                          "or a LAVIS/EVA-CLIP .pth", random_by_design=opts.variant == "tiny")


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
            weight_sources=weight_sources,
        )
    ]
