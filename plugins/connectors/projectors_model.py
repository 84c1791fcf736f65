"""LLaVA's projectors (torch): every encoder token mapped to the LLM's width.

`linear` is LLaVA's `Linear(E -> D)`; `mlp` is LLaVA-1.5's `mlp{depth}x_gelu`: `Linear(E -> D)`, then
`(GELU, Linear(D -> D))` repeated depth-1 times. The layers sit in one `nn.Sequential`, so the
state-dict keys are LLaVA's `mm_projector.{i}.*` without the prefix.
"""

from __future__ import annotations

import torch
from torch import nn

from vlbridge.errors import VLBridgeError
from vlbridge.plugins.connectors import projectors as spec
from vlbridge.plugins.connectors.projectors import LinearOptions, MLPOptions
from vlbridge.plugin.specs import TokenShape


class Projector(nn.Module):
    """(B, N, encoder_width) -> (B, N, llm_width); trained in stage 2 only (no stage 1)."""

    def __init__(self, encoder_width: int, llm_width: int, depth: int = 1):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(encoder_width, llm_width)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(llm_width, llm_width)]
        self.layers = nn.Sequential(*layers)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(image_embeds.to(self.layers[0].weight.dtype))

    def set_stage(self, stage: int) -> None:
        """Stage 2 trains every parameter; there is no stage 1 (no image-text pre-training)."""
        if stage != 2:
            raise VLBridgeError(f"projector connectors have no stage {stage!r}: they are trained in stage 2 only (set stage: 2)")
        self.requires_grad_(True)


def build_linear(opts: LinearOptions, encoder_out: TokenShape, llm_width: int) -> Projector:
    """The `linear` spec's factory."""
    spec.output(opts, encoder_out, llm_width)  # raises IncompatibleError for a pinned encoder width
    return Projector(encoder_out.width, llm_width, depth=1)


def build_mlp(opts: MLPOptions, encoder_out: TokenShape, llm_width: int) -> Projector:
    """The `mlp` spec's factory (GELU is the only activation the options allow)."""
    spec.output(opts, encoder_out, llm_width)
    return Projector(encoder_out.width, llm_width, depth=opts.depth)
