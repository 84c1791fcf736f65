"""The resampler itself (torch). Built by vlbridge through the spec's factory string."""

from __future__ import annotations

import torch
from torch import nn

from vlbridge import TokenShape
from vlbridge_resampler.plugin import ResamplerOptions


class ResamplerBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm_latents = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_ffn = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, latents: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        q = self.norm_latents(latents)
        kv = torch.cat([image, q], dim=1)  # latents attend to the image and to themselves
        latents = latents + self.attn(q, kv, kv, need_weights=False)[0]
        return latents + self.ffn(self.norm_ffn(latents))


class Resampler(nn.Module):
    """(B, N, encoder_width) image tokens -> (B, num_latents, llm_width) visual tokens."""

    def __init__(self, opts: ResamplerOptions, encoder_out: TokenShape, llm_width: int):
        super().__init__()
        self.input = nn.Linear(encoder_out.width, opts.width)
        self.latents = nn.Parameter(torch.randn(opts.num_latents, opts.width) * 0.02)
        self.blocks = nn.ModuleList(ResamplerBlock(opts.width, opts.heads) for _ in range(opts.depth))
        self.norm = nn.LayerNorm(opts.width)
        self.proj = nn.Linear(opts.width, llm_width)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        image = self.input(image_embeds)
        latents = self.latents.expand(image.shape[0], -1, -1)
        for block in self.blocks:
            latents = block(latents, image)
        return self.proj(self.norm(latents))


def build(opts: ResamplerOptions, encoder_out: TokenShape, llm_width: int) -> Resampler:
    return Resampler(opts, encoder_out, llm_width)
