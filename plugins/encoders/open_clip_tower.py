"""Registration of `open-clip`: the tokens of any open_clip ViT tower (declarations only, no torch).

Shapes and preprocessing come from open_clip's own JSON model configs, read without importing
open_clip (`open_clip_configs`), so an assembly validates before anything is built. `layer` is a
Python index over the blocks' outputs like `clip-vit-l`'s: -1 the last block, -2 the penultimate
(LLaVA's choice and the default). Tokens are taken before the final norm and pooling head.

[CLS] handling: `include_cls` keeps or drops every token before the patches ([CLS] and, for a timm
trunk with registers, the register tokens). Towers without such tokens (SigLIP's, `gap` ViTs) have
nothing to keep or drop, so the option does not change their output; it is not an error, so that
one assembly can switch between CLIP and SigLIP towers by `arch` alone.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from vlbridge.plugin.hookspecs import hookimpl
from vlbridge.plugin.sources import WeightSource, file_or_random
from vlbridge.plugins.encoders.open_clip_configs import (
    TowerFacts, describe_tower, is_weights_file, preprocessing, read_arch, tag_source, vision_cfg_of,
)
from vlbridge.plugins.encoders.open_clip_params import native_params, timm_params
from vlbridge.plugin.specs import EncoderSpec, Options, Precision, Preprocess, TokenShape


class OpenClipOptions(Options):
    arch: str = Field("ViT-B-16", description="an open_clip architecture name (ViT-B-32, ViT-L-14-336, ViT-SO400M-14-SigLIP, "
                      "EVA02-B-16, ...), the path of a model config JSON (or of a hub repository's open_clip_config.json), "
                      "or 'tiny': a small random-weight ViT for tests. ResNet/ConvNeXt/Swin trunks yield no token sequence and are refused")
    pretrained: str | None = Field(None, description="a local open_clip checkpoint (.safetensors, or .pt/.pth/.bin read with "
                                   "weights_only), or an open_clip tag such as 'openai' (needs the network or open_clip's cache); none = random init")
    layer: int = Field(-2, description="which block's output to use, Python-style index: -1 last, -2 penultimate (LLaVA's and the default)")
    include_cls: bool = Field(True, description="keep the tokens before the patches ([CLS], registers); towers without them (SigLIP) are unaffected")
    image_size: int | None = Field(None, ge=1, description="input resolution (a multiple of the patch size); default the config's. "
                                   "Position embeddings of loaded weights are resampled, as open_clip's force_image_size does")
    quick_gelu: bool | None = Field(None, description="QuickGELU activations in open_clip's own ViT (OpenAI's weights need them); "
                                    "default: the config's quick_gelu, else the tag's. timm trunks ignore it")
    dtype: Precision = Field("fp32", description="compute dtype of the frozen encoder")

    @model_validator(mode="after")
    def _check(self) -> "OpenClipOptions":
        facts = self.tower
        if self.image_size is not None and self.image_size % facts.patch:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the patch size {facts.patch} of {self.arch}")
        if not -facts.depth <= self.layer < facts.depth:
            raise ValueError(f"layer {self.layer} is out of range for the {facts.depth} blocks of {self.arch} (use -{facts.depth}..{facts.depth - 1})")
        preprocess(self)  # an unsupported resize mode or interpolation is an option error too
        return self

    @property
    def arch_config(self) -> dict[str, Any]:
        return read_arch(self.arch)[0]

    @property
    def tower(self) -> TowerFacts:
        return describe_tower(self.arch_config, self.arch)

    @property
    def tag(self) -> str | None:
        """The open_clip pretrained tag, when `pretrained` is one rather than a file."""
        return self.pretrained if self.pretrained and not is_weights_file(self.pretrained) else None

    @property
    def resolved_image_size(self) -> int:
        return self.image_size or self.tower.image_size


def output(opts: OpenClipOptions) -> TokenShape:
    facts = opts.tower
    grid = opts.resolved_image_size // facts.patch
    return TokenShape(grid * grid + (facts.prefix_tokens if opts.include_cls else 0), facts.width)


def preprocess(opts: OpenClipOptions) -> Preprocess:
    """open_clip's eval transform for this arch and tag: its mean/std, interpolation and resize mode."""
    chosen = preprocessing(opts.arch, opts.tag, read_arch(opts.arch)[1])
    return Preprocess(opts.resolved_image_size, chosen["mean"], chosen["std"], chosen["interpolation"], chosen["resize_mode"])


def num_params(opts: OpenClipOptions) -> int | None:
    """Parameters of the built tower: blocks 0..layer and what precedes them (finish() prunes the rest);
    None where the trunk's layout is not known from its config (see open_clip_params)."""
    facts = opts.tower
    blocks = opts.layer % facts.depth + 1
    if facts.trunk == "timm":
        return timm_params(facts, opts.resolved_image_size, blocks)
    return native_params(vision_cfg_of(opts.arch_config, opts.arch), opts.resolved_image_size, blocks)


def weight_sources(opts: OpenClipOptions, stage: int) -> list[WeightSource]:
    """`pretrained`: an open_clip tag (its hub repo) or a local file; unset, only the 'tiny' tower may be random."""
    accepts = "a local open_clip checkpoint file (or a tag where the hub is reachable)"
    if opts.tag is not None:
        return [tag_source("pretrained", opts.arch, opts.tag, accepts)]
    return file_or_random("pretrained", opts.pretrained, accepts, random_by_design=opts.arch == "tiny")


@hookimpl
def vlbridge_register_encoders() -> list[EncoderSpec]:
    return [
        EncoderSpec(
            name="open-clip",
            description="any open_clip ViT tower (CLIP, SigLIP, EVA02, ...) by architecture name; block tokens, open_clip's preprocessing",
            factory="vlbridge.plugins.encoders.open_clip_tower_model:build",
            options=OpenClipOptions,
            output=output,
            preprocess=preprocess,
            num_params=num_params,
            weight_sources=weight_sources,
        )
    ]
