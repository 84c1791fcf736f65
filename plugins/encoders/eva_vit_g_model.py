"""BLIP-2's frozen EVA ViT-g/14, built from `EvaVitGOptions` (factory of the `eva-vit-g` encoder).

A plain pre-LN ViT: conv patch embedding (with bias), a [CLS] token, learned absolute position
embeddings, blocks of attention (a qkv weight without bias plus separate q and v biases; the k
bias is zero) and a GELU MLP. There is no final norm: the output is every token of the last kept
block, `(B, 1 + (S/P)^2, W)`. BLIP-2 keeps 39 of EVA-CLIP-g's 40 blocks, so its features come
from the second-last layer; its `ln_vision` (transformers' `post_layernorm`) belongs to the connector.

The whole encoder computes in `opts.dtype`, as transformers does. LAVIS's fp16 casts only the
Linear/Conv weights and runs under autocast, so fp16 features differ from LAVIS's by rounding.
"""

from __future__ import annotations

import math
import re
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlbridge.parts.attention import attention
from vlbridge.errors import VLBridgeError, WeightsError
from vlbridge.parts.freeze import FrozenPart, torch_dtype
from vlbridge.plugins.encoders import eva_vit_g
from vlbridge.files.weights import StateDict, strict_load
from vlbridge.plugins.encoders.eva_vit_g import EvaVitGOptions
from vlbridge.plugins.encoders.eva_vit_g_convert import read_eva_checkpoint
from vlbridge.plugin.specs import Preprocess, TokenShape

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


class EvaAttention(nn.Module):
    """Multi-head self-attention with EVA's biases: learned q and v biases, no k bias."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])  # (3W,)
        qkv = F.linear(x, self.qkv.weight, bias)  # (B, T, 3W)
        qkv = qkv.reshape(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, H, T, Dh)
        out = attention(qkv[0], qkv[1], qkv[2])  # (B, H, T, Dh), no mask: every token sees all
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, width))  # (B, T, W)


class EvaMlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as in EVA and transformers' BLIP-2
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EvaBlock(nn.Module):
    """Pre-LN transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, width: int, heads: int, mlp_hidden: int, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = EvaAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = EvaMlp(width, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, width: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)  # with bias, as in EVA

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)  # (B, W, g, g) -> (B, g*g, W)


class EvaViTG(FrozenPart):
    """EVA ViT-g/14 as BLIP-2 uses it: `(B, 3, S, S)` normalised pixels -> `(B, T, W)` tokens."""

    def __init__(self, opts: EvaVitGOptions, device: torch.device | str | None = None) -> None:
        super().__init__()
        arch = opts.arch
        self.opts = opts
        self.width, self.patch, self.depth = arch["width"], arch["patch"], arch["depth"]
        self.image_size = opts.resolved_image_size
        self.num_tokens = (self.image_size // self.patch) ** 2 + 1
        self.preprocess: Preprocess = eva_vit_g.preprocess(opts)
        with torch.device(device) if device is not None else nullcontext():
            self.patch_embed = PatchEmbed(self.width, self.patch)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, self.width))
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, self.width))
            self.blocks = nn.ModuleList(
                EvaBlock(self.width, arch["heads"], arch["mlp_hidden"], opts.layer_norm_eps)
                for _ in range(opts.resolved_blocks)
            )
        if not self.cls_token.is_meta:
            self._init_weights()

    def _init_weights(self) -> None:
        """Random stand-in weights (truncated normal, std 0.02, as EVA initialises)."""
        for name, param in self.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight")):
                nn.init.ones_(param)
            elif (param.dim() > 1 and name.endswith("weight")) or name in ("cls_token", "pos_embed"):
                nn.init.trunc_normal_(param, std=0.02)
            else:
                nn.init.zeros_(param)

    @property
    def output_shape(self) -> TokenShape:
        """What `forward` really returns per image: tokens x width (checked against the spec)."""
        return TokenShape(self.num_tokens, self.width)

    def finetune_blocks(self) -> list[nn.Module]:
        """The blocks in forward order, for partial unfreezing, layer decay and gradient checkpointing
        (vlbridge.finetune.encoder_tuning)."""
        return list(self.blocks)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        expected = (3, self.image_size, self.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise VLBridgeError(f"eva-vit-g expects pixels shaped (B, {', '.join(map(str, expected))}), got {tuple(pixel_values.shape)}")
        x = self.patch_embed(pixel_values.to(self.pos_embed.dtype))  # (B, g*g, W)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, W)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, T, W)
        for block in self.blocks:
            x = block(x)
        return x

    def load_pretrained(self, path: str | Path) -> str:
        """Strictly load any supported checkpoint (see `eva_vit_g_convert`); return the format found.

        Blocks between the kept ones and the architecture's depth (EVA-CLIP-g's 40th) are skipped
        on purpose; position embeddings of another resolution are interpolated.
        """
        state, fmt = read_eva_checkpoint(path)
        source = f"{fmt} {str(path)!r}"
        state = self._skip_unused_blocks(state)
        if "pos_embed" in state and state["pos_embed"].shape[-1] == self.width:
            state["pos_embed"] = resize_pos_embed(state["pos_embed"], self.num_tokens, source)
        strict_load(self, state, source)
        return fmt

    def _skip_unused_blocks(self, state: StateDict) -> StateDict:
        """Drop blocks `kept..depth-1`: they exist in the checkpoint but BLIP-2 does not run them."""
        kept = len(self.blocks)

        def used(key: str) -> bool:
            match = _BLOCK_KEY.match(key)
            return match is None or not kept <= int(match[1]) < self.depth

        return {key: value for key, value in state.items() if used(key)}


def resize_pos_embed(pos_embed: torch.Tensor, num_tokens: int, source: str = "checkpoint") -> torch.Tensor:
    """`(1, 1 + g*g, W)` -> `(1, num_tokens, W)`: bicubic over the patch grid, [CLS]'s position kept."""
    if pos_embed.shape[1] == num_tokens:
        return pos_embed
    old, new = math.isqrt(pos_embed.shape[1] - 1), math.isqrt(num_tokens - 1)
    if old * old + 1 != pos_embed.shape[1] or new * new + 1 != num_tokens:
        raise WeightsError(
            f"{source}: cannot interpolate pos_embed of {pos_embed.shape[1]} tokens to {num_tokens}; "
            "both must be 1 + a square grid of patches"
        )
    width = pos_embed.shape[-1]
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    grid = grid.reshape(1, old, old, width).permute(0, 3, 1, 2)  # (1, W, g, g)
    grid = F.interpolate(grid.float(), size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, width)  # (1, n*n, W)
    return torch.cat([cls, grid.to(pos_embed.dtype)], dim=1)


def build(opts: EvaVitGOptions) -> EvaViTG:
    """The `eva-vit-g` factory: random init, or `opts.pretrained` loaded strictly; frozen, in `opts.dtype`.

    With weights to load, the model is built on the meta device so that ~1B parameters are not
    randomly initialised only to be overwritten.
    """
    pretrained = opts.pretrained
    model = EvaViTG(opts, device="meta" if pretrained else None)
    if pretrained:
        model.load_pretrained(pretrained)
    return model.to(torch_dtype(opts.dtype)).freeze()
