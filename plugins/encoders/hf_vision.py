"""Registration of `hf-vision`: the hidden states of a transformers vision tower (declarations only, no torch).

Any CLIP, SigLIP, DINOv2 (with or without registers), DINOv3, ViT or ViT-MAE tower saved by save_pretrained, full
dual-tower CLIP / SigLIP directories included (their vision half is used), and other ViT-like
towers whose forward returns `hidden_states` once `prefix_tokens` says how many tokens precede
the patches. Shapes and preprocessing come from the directory's `config.json` and
`preprocessor_config.json`, read without torch (`hf_vision_configs`).

The features are `model(pixel_values, output_hidden_states=True).hidden_states[layer]`:
`hidden_states[0]` is the embedding output, `hidden_states[i]` block i's output, so the default -2
is the penultimate block (LLaVA's choice; the same block as `clip-vit-l`'s and `open-clip`'s -2).
By default nothing else is applied: `final_norm` adds the tower's last norm (DINOv2's `layernorm`
and SigLIP's `post_layernorm`, which transformers applies to `last_hidden_state` only; CLIP's
`post_layernorm`, which transformers applies to the pooled [CLS] only). Token selection: [CLS]
kept by default (`include_cls`, BLIP-2's choice); DINOv2's and DINOv3's register tokens dropped by default
(`include_registers`: they hold no patch content). SigLIP has no [CLS]: `include_cls` changes
nothing there, on purpose, so one assembly can switch towers by `model` alone. ViT-MAE's forward
masks a random 75% of the patches (its pre-training): hf-vision turns the masking off, so it sees
every patch in order.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from vlbridge.plugin.hookspecs import hookimpl
from vlbridge.plugin.sources import WeightSource, local_or_hub
from vlbridge.plugins.encoders.hf_vision_configs import (
    KNOWN_TOWERS, TINY_CONFIG, TowerFacts, describe_tower, family_preprocess, processor_preprocess, read_source, rescaled, vision_values,
)
from vlbridge.plugins.encoders.hf_vision_params import count_params
from vlbridge.plugin.specs import EncoderSpec, Options, Precision, Preprocess, SizeEstimate, TokenShape

Variant = Literal["clip-l-336", "siglip-so400m", "dinov2-large", "tiny"]


class HFVisionOptions(Options):
    variant: Variant = Field("clip-l-336", description="the tower when `model` is not set: clip-l-336 (openai/clip-vit-large-patch14-336, "
                             "LLaVA-1.5's), siglip-so400m (google/siglip-so400m-patch14-384), dinov2-large (facebook/dinov2-large), "
                             "or tiny: a small random-weight CLIP tower for tests (no download)")
    model: str | None = Field(None, description="a local directory written by save_pretrained (a vision model, or a full CLIP/SigLIP "
                              "model whose vision half is used), or a hub id where the hub is reachable; replaces `variant`")
    layer: int = Field(-2, description="index into hidden_states: 0 is the embedding output, i block i's output, -1 the last "
                       "block's, -2 the penultimate (LLaVA's and the default)")
    include_cls: bool = Field(True, description="keep the [CLS] token (BLIP-2 does; LLaVA drops it); SigLIP has none and is unaffected")
    include_registers: bool = Field(False, description="keep DINOv2's or DINOv3's register tokens (after [CLS]); they carry no patch content, so they are dropped by default")
    final_norm: bool = Field(False, description="apply the tower's final norm (DINOv2 layernorm, SigLIP/CLIP post_layernorm) to the "
                             "chosen hidden state; off by default, so the tokens equal hidden_states[layer]")
    image_size: int | None = Field(None, ge=1, description="input resolution, a multiple of the patch size; default the image processor's "
                                   "crop (or the config's image_size). Position embeddings are interpolated by the model")
    keep_all_layers: bool = Field(False, description="keep the blocks after `layer` and the pooling head, which are never run "
                                  "(removed by default to save memory and time); for exporting the whole tower, e.g. back to LLaVA")
    prefix_tokens: int | None = Field(None, ge=0, description="for a model type hf-vision has no table entry for: how many tokens "
                                      "precede the patch tokens (class, distillation tokens); include_cls keeps or drops them all")
    dtype: Precision = Field("fp32", description="compute dtype of the frozen encoder")

    @model_validator(mode="after")
    def _check(self) -> "HFVisionOptions":
        facts = self.tower
        if self.image_size is not None and self.image_size % facts.patch:  # a tower's own size may leave a margin (SigLIP 384/14)
            raise ValueError(f"image_size {self.image_size} is not a multiple of the patch size {facts.patch} of {self.where}")
        if not -(facts.layers + 1) <= self.layer <= facts.layers:
            raise ValueError(f"layer {self.layer} is out of range for hidden_states of {self.where}, which has {facts.layers} blocks "
                             f"(use -{facts.layers + 1}..{facts.layers}; 0 is the embedding output)")
        preprocess(self)  # an image processor vlbridge cannot follow is an option error too
        return self

    @property
    def source(self) -> str | None:
        """Where the weights come from: `model`, the variant's hub id, or None for the random tiny tower."""
        if self.model:
            return self.model
        return None if self.variant == "tiny" else KNOWN_TOWERS[self.variant].hub_id

    @property
    def where(self) -> str:
        return self.source or "the tiny hf-vision tower"

    @property
    def files(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(config.json, preprocessor_config.json or None) of the tower, read without torch."""
        return (TINY_CONFIG, None) if self.source is None else read_source(self.source)

    @property
    def tower(self) -> TowerFacts:
        return describe_tower(self.files[0], self.where, self.prefix_tokens)

    @property
    def resolved_image_size(self) -> int:
        return self.image_size or native_preprocess(self).image_size


def native_preprocess(opts: HFVisionOptions) -> Preprocess:
    """The tower's own image processor (or its family's defaults), before any image_size override."""
    processor = opts.files[1]
    return processor_preprocess(processor, opts.where) if processor is not None else family_preprocess(opts.tower, opts.where)


def kept_prefix(opts: HFVisionOptions) -> tuple[int, int]:
    """(class tokens kept, register tokens kept) in front of the patch tokens."""
    facts = opts.tower
    return (facts.cls_tokens if opts.include_cls else 0), (facts.registers if opts.include_registers else 0)


def output(opts: HFVisionOptions) -> TokenShape:
    facts = opts.tower
    grid = opts.resolved_image_size // facts.patch
    return TokenShape(grid * grid + sum(kept_prefix(opts)), facts.width)


def preprocess(opts: HFVisionOptions) -> Preprocess:
    return rescaled(native_preprocess(opts), opts.resolved_image_size)


def kept_blocks(opts: HFVisionOptions) -> int:
    """Blocks the built tower holds: all with keep_all_layers, else up to hidden_states[layer] (at least
    one: transformers collects hidden_states while blocks run; see hf_vision_model)."""
    layers = opts.tower.layers
    return layers if opts.keep_all_layers else max(opts.layer % (layers + 1), 1)


def num_params(opts: HFVisionOptions) -> int | SizeEstimate | None:
    """Parameters of the built tower (position embeddings at the config's resolution: an image_size
    override interpolates them at run time); an estimate for a family without an exact formula."""
    model_type, _, values = vision_values(opts.files[0])
    return count_params(model_type, values, kept_blocks(opts), head=opts.keep_all_layers)


def weight_sources(opts: HFVisionOptions, stage: int) -> list[WeightSource]:
    """`model`, or the variant's hub id (a default, named as one); the tiny tower loads nothing."""
    return local_or_hub("model", opts.source, default=not opts.model)


@hookimpl
def vlbridge_register_encoders() -> list[EncoderSpec]:
    return [
        EncoderSpec(
            name="hf-vision",
            description="any transformers vision tower (CLIP, SigLIP, DINOv2, ViT, ...) from a save_pretrained directory; hidden_states[layer]",
            factory="vlbridge.plugins.encoders.hf_vision_model:build",
            options=HFVisionOptions,
            output=output,
            preprocess=preprocess,
            num_params=num_params,
            weight_sources=weight_sources,
        )
    ]
