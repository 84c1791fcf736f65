"""Registration module: declarations only. vlbridge imports this to list and validate, so it must
not import torch; the model module is named by the factory string and imported only to build."""

from __future__ import annotations

from pydantic import Field, model_validator

import vlbridge
from vlbridge import ConnectorSpec, IncompatibleError, Options, TokenShape


class ResamplerOptions(vlbridge.Options):
    num_latents: int = Field(64, ge=1, description="learned latents = visual tokens given to the LLM")
    width: int = Field(512, ge=8, description="width of the latents inside the resampler")
    depth: int = Field(2, ge=1, description="cross-attention + FFN blocks")
    heads: int = Field(8, ge=1, description="attention heads")
    max_encoder_tokens: int = Field(4096, ge=1, description="refuse encoders that emit more tokens than this")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ResamplerOptions":
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        return self


def output(opts: ResamplerOptions, encoder_out: TokenShape, llm_width: int) -> TokenShape:
    if encoder_out.num_tokens > opts.max_encoder_tokens:
        raise IncompatibleError(f"encoder gives {encoder_out.num_tokens} tokens, more than max_encoder_tokens {opts.max_encoder_tokens}")
    return TokenShape(opts.num_latents, llm_width)


def num_params(opts: ResamplerOptions, encoder_out: TokenShape, llm_width: int) -> dict[int, int]:
    w, e = opts.width, encoder_out.width
    block = 2 * w + (w * w + w) + 2 * (w * w + w) + (w * w + w) + 2 * w + (w * 4 * w + 4 * w) + (4 * w * w + w)
    total = (e * w + w) + opts.num_latents * w + opts.depth * block + 2 * w + (w * llm_width + llm_width)
    return {2: total}


@vlbridge.hookimpl
def vlbridge_register_connectors() -> list[ConnectorSpec]:
    return [
        ConnectorSpec(
            name="resampler",
            description="Flamingo's Perceiver resampler: learned latents cross-attend to the image tokens",
            factory="vlbridge_resampler.model:build",
            options=ResamplerOptions,
            output=output,
            num_params=num_params,
        )
    ]
