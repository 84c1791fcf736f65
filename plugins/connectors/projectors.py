"""Registration of `linear` (LLaVA) and `mlp` (LLaVA-1.5's mlp2x_gelu) projectors (no torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from vlbridge.plugin.hookspecs import hookimpl
from vlbridge.errors import IncompatibleError
from vlbridge.plugin.specs import ConnectorSpec, Options, TokenShape


class LinearOptions(Options):
    encoder_width: int | None = Field(None, ge=1, description="pin the encoder width (e.g. to match pretrained projector weights); none = the encoder's")


class MLPOptions(Options):
    depth: int = Field(2, ge=1, description="number of Linear layers, GELU between them (2 = LLaVA-1.5's mlp2x_gelu)")
    activation: Literal["gelu"] = Field("gelu", description="activation between layers")
    encoder_width: int | None = Field(None, ge=1, description="pin the encoder width (e.g. to match pretrained projector weights); none = the encoder's")


def output(opts: LinearOptions | MLPOptions, encoder_out: TokenShape, llm_width: int) -> TokenShape:
    """Every encoder token becomes one visual token of the LLM's width."""
    if opts.encoder_width is not None and opts.encoder_width != encoder_out.width:
        raise IncompatibleError(f"projector expects encoder width {opts.encoder_width} (connector.options.encoder_width) but the encoder gives {encoder_out.width}")
    return TokenShape(encoder_out.num_tokens, llm_width)


def linear_params(opts: LinearOptions, encoder_out: TokenShape, llm_width: int) -> dict[int, int]:
    return {2: encoder_out.width * llm_width + llm_width}


def mlp_params(opts: MLPOptions, encoder_out: TokenShape, llm_width: int) -> dict[int, int]:
    first = encoder_out.width * llm_width + llm_width
    return {2: first + (opts.depth - 1) * (llm_width * llm_width + llm_width)}


@hookimpl
def vlbridge_register_connectors() -> list[ConnectorSpec]:
    return [
        ConnectorSpec(
            name="linear",
            description="LLaVA's linear projector: each encoder token mapped to the LLM's width",
            factory="vlbridge.plugins.connectors.projectors_model:build_linear",
            options=LinearOptions,
            output=output,
            num_params=linear_params,
        ),
        ConnectorSpec(
            name="mlp",
            description="LLaVA-1.5's MLP projector (mlp2x_gelu by default)",
            factory="vlbridge.plugins.connectors.projectors_model:build_mlp",
            options=MLPOptions,
            output=output,
            num_params=mlp_params,
        ),
    ]
