"""Attention with dropout for the Q-Former's training on CPU, computed in cache-sized blocks.

torch has no fused CPU kernel for attention with dropout, so training ran the eager math over the
whole (B, H, Lq, Lk) probabilities: scores, softmax, the dropout mask (drawn, cast to float, scaled),
the masked probabilities, and in backward the same again, each a pass through main memory (ITM's
cross-attention: 4.7M probabilities, 19 MB per tensor at BLIP-2's stage-1 batch here). This runs the
same operations a few batch rows at a time, so that each block's scores, mask and products stay in
the CPU cache, and keeps only the probabilities and an int16 keep mask for backward. torch's
`_softmax` / `_softmax_backward_data` are called for their out= forms (into the block's buffers).

The numbers are those of `vlbridge.parts.attention`'s eager path with `vlbridge.parts.dropout`'s
masks: the same per-row matmuls and softmax, and the same random words in the same order (drawn
block by block from the default generator), so a seeded run gives the same losses.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from vlbridge.parts.dropout import DRAW_BITS, drop_threshold

BLOCK_BYTES = 1 << 20  # scores per block: about what stays in a core's cache next to its operands
_LEVELS = 1 << DRAW_BITS


def blocked_dropout_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh), masked) with inverted dropout `p`, times v; (B, H, L, Dh) in, CPU.

    `mask`: boolean, broadcastable to (B, H, Lq, Lk), True = may attend; every row must see some
    key (`sees_some_key`). fp32 only: the reference computes the softmax in fp32 whatever the dtype."""
    return _BlockedAttention.apply(q, k, v, mask, p)


def sees_some_key(mask: torch.Tensor | None) -> bool:
    """Whether every query row of a boolean mask may attend to some key (the blocked path's premise;
    the reference zeroes rows that see none)."""
    return mask is None or bool(mask.any(dim=-1).all())


def _rows_per_block(batch: int, heads: int, length: int, keys: int) -> int:
    """Batch rows per block: about BLOCK_BYTES of fp32 scores, and a whole number of four-draw words
    (so that drawing block by block takes the same words as drawing all at once)."""
    per_row = heads * length * keys
    step = 4 // math.gcd(per_row, 4)
    rows = max(step, BLOCK_BYTES // (4 * per_row) // step * step)
    return min(batch, rows)


def _draw_keep(shape: torch.Size, threshold: int, words: torch.Tensor, out: torch.Tensor) -> None:
    """`vlbridge.parts.dropout.keep_mask`'s draws for `out` (int16, 1 = keep; boolean tensors are
    several times slower to make and to multiply by on CPU): the next 63-bit words of the default
    generator, four 15-bit draws each, kept where at least `threshold`."""
    count = math.prod(shape)
    draws = words[: (count + 3) // 4].random_().view(torch.int16)[:count].bitwise_and_(0x7FFF)
    torch.ge(draws.view(shape), threshold, out=out)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as a 4-D additive one, 0 or -inf: adding 0 leaves a score as it is, and adding is
    several times faster than filling through a boolean mask on CPU."""
    bias = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))
    return bias.view((1,) * (4 - bias.dim()) + tuple(bias.shape))


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) -> contiguous (B*H, L, D), so that blocks of rows are bmm operands without copies."""
    return x.reshape(-1, *x.shape[2:]) if x.is_contiguous() else x.contiguous().view(-1, *x.shape[2:])


class _BlockedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, p: float) -> torch.Tensor:
        batch, heads, length, head_dim = q.shape
        threshold = drop_threshold(p)
        scale = _LEVELS / (_LEVELS - threshold)  # kept probabilities are divided by the keep rate
        q_scaled, k_flat, v_flat = _flat(q * (1.0 / math.sqrt(head_dim))), _flat(k), _flat(v)
        probs = q.new_empty(batch, heads, length, k.shape[2])
        keep = torch.empty(probs.shape, dtype=torch.int16)
        out = q.new_empty(batch * heads, length, v.shape[3])
        bias = None if mask is None else _additive(mask, q.dtype)
        rows = _rows_per_block(batch, heads, length, k.shape[2])
        words = torch.empty((rows * heads * length * k.shape[2] + 3) // 4, dtype=torch.int64)
        scratch = q.new_empty(2, rows, heads, length, k.shape[2])  # reused by every block: stays in cache
        for start in range(0, batch, rows):
            stop = min(start + rows, batch)
            flat = slice(start * heads, stop * heads)
            scores, dropped = scratch[0, : stop - start], scratch[1, : stop - start]
            torch.bmm(q_scaled[flat], k_flat[flat].transpose(1, 2), out=scores.view(-1, length, k.shape[2]))
            if bias is not None:
                scores.add_(bias if bias.shape[0] == 1 else bias[start:stop])
            block_probs = torch._softmax(scores, -1, False, out=probs[start:stop])
            _draw_keep(scores.shape, threshold, words, keep[start:stop])
            torch.mul(block_probs, scale, out=dropped).mul_(keep[start:stop])
            torch.bmm(dropped.view(-1, length, k.shape[2]), v_flat[flat], out=out[flat])
        ctx.save_for_backward(q_scaled, k_flat, v_flat, probs, keep)
        ctx.scales = (scale, 1.0 / math.sqrt(head_dim))
        return out.view(batch, heads, length, -1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q_scaled, k, v, probs, keep = ctx.saved_tensors
        scale, q_scale = ctx.scales
        batch, heads, length, keys = probs.shape
        grad = _flat(grad)
        grad_q, grad_k, grad_v = torch.empty_like(q_scaled), torch.empty_like(k), torch.empty_like(v)
        rows = _rows_per_block(batch, heads, length, keys)
        scratch = probs.new_empty(3, rows * heads, length, keys)
        for start in range(0, batch, rows):
            stop = min(start + rows, batch)
            flat = slice(start * heads, stop * heads)
            dropped, grad_dropped, grad_scores = scratch[:, : (stop - start) * heads]
            block_probs = probs[start:stop].view(-1, length, keys)
            block_keep = keep[start:stop].view(-1, length, keys)
            torch.mul(block_probs, scale, out=dropped).mul_(block_keep)
            torch.bmm(dropped.transpose(1, 2), grad[flat], out=grad_v[flat])
            torch.bmm(grad[flat], v[flat].transpose(1, 2), out=grad_dropped)
            grad_dropped.mul_(scale).mul_(block_keep)
            torch._softmax_backward_data(grad_dropped, block_probs, -1, block_probs.dtype, grad_input=grad_scores)
            torch.bmm(grad_scores, k[flat], out=grad_q[flat])
            torch.bmm(grad_scores.transpose(1, 2), q_scaled[flat], out=grad_k[flat])
        shape = (batch, heads, -1, q_scaled.shape[-1])
        return grad_q.mul_(q_scale).view(shape), grad_k.view(shape), grad_v.view(shape), None, None
