"""Building blocks of the Q-Former: BERT's post-LN layers with BLIP-2's query/text split.

A layer runs self-attention over `[queries ; text]`, then (queries only) cross-attention to the
image in every `cross_attention_freq`-th layer, then a separate FFN for queries and for text.
All attention goes through `vlbridge.parts.attention.attention`, except training attention with
dropout on CPU, which runs `qformer_attention.blocked_dropout_attention` (the same numbers, faster).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlbridge.parts.attention import attention, forced_backend
from vlbridge.parts.dropout import Dropout, dropout
from vlbridge.errors import VLBridgeError
from vlbridge.plugins.connectors.qformer_attention import blocked_dropout_attention, sees_some_key


KV = tuple[torch.Tensor, torch.Tensor]  # keys and values, each (B, H, L, Dh)


@dataclass(frozen=True)
class NormedTokens:
    """Image tokens normalised by ln_vision without its affine, and that affine (None where the norm
    has none): what `Attention.attend_folded` reads. Folding the affine into the key and value
    weights (W diag(w), b + W b_ln) leaves the big products over the tokens without a gradient to
    compute: with frozen image tokens, ln_vision's own gradient then comes from the small weight
    products, not from the (B, N, C) token gradient that the unfolded layers need."""

    tokens: torch.Tensor  # (B, N, C)
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    def folded(self, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """`linear`'s (weight, bias) as applied to the affine-normalised tokens."""
        weight, bias = linear.weight, linear.bias
        if self.bias is not None:
            bias = bias + weight @ self.bias.to(weight.dtype)
        if self.weight is not None:
            weight = weight * self.weight.to(weight.dtype)
        return weight, bias


class Attention(nn.Module):
    """Multi-head attention with BERT's output block: LN(x + dropout(dense(attn(x, context))))."""

    def __init__(self, width: int, context_width: int, heads: int, eps: float, dropout: float):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(context_width, width)
        self.value = nn.Linear(context_width, width)
        self.dense = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.dropout = Dropout(dropout)
        self.attn_dropout = dropout

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, -1).transpose(1, 2)  # (B, L, W) -> (B, H, L, Dh)

    def key_values(self, source: torch.Tensor | NormedTokens) -> KV:
        """(B, L, C) -> this block's keys and values of `source`: what a pass may compute once and reuse
        (`NormedTokens`: through the weights with the norm's affine folded in, the same K/V)."""
        if isinstance(source, NormedTokens):
            return (self._split_heads(F.linear(source.tokens, *source.folded(self.key))),
                    self._split_heads(F.linear(source.tokens, *source.folded(self.value))))
        return self._split_heads(self.key(source)), self._split_heads(self.value(source))

    def attend(self, x: torch.Tensor, kv: KV, mask: torch.Tensor | None) -> torch.Tensor:
        """The block on `x` (B, L, W) reading the given keys and values."""
        q = self._split_heads(self.query(x))
        if self._blocked(q, mask):
            out = blocked_dropout_attention(q, kv[0], kv[1], mask, self.attn_dropout)
        else:
            out = attention(q, kv[0], kv[1], mask, dropout_p=self.attn_dropout if self.training else 0.0)
        batch, _, length, _ = out.shape
        out = out.transpose(1, 2).reshape(batch, length, -1)  # (B, H, L, Dh) -> (B, L, W)
        return self.norm(x + self.dropout(self.dense(out)))

    def _blocked(self, q: torch.Tensor, mask: torch.Tensor | None) -> bool:
        """Whether training attention runs `blocked_dropout_attention`: fp32 with dropout on CPU, where
        torch has no fused kernel, unless the eager reference is forced (VLBRIDGE_ATTENTION=eager), or
        xformers is, which `attention` refuses on CPU rather than this path running in its place."""
        return (self.training and self.attn_dropout > 0.0 and q.device.type == "cpu" and q.dtype == torch.float32
                and forced_backend() not in ("eager", "xformers") and sees_some_key(mask))

    def attend_folded(self, x: torch.Tensor, image: NormedTokens) -> torch.Tensor:
        """Unmasked cross-attention of `x` (B, L, W) to the image tokens (B, N, C) without projecting
        them: scores are (q Wk_h) tokens^T and the output (P tokens) Wv_h, per head h, with ln_vision's
        affine folded into Wk and Wv (`NormedTokens`). Exact in real arithmetic (the key bias adds
        q . b_k to each score row, kept so that it gets the same gradient as when projecting; the
        value bias is added times each row's probability mass, 1 unless dropout dropped some);
        cheaper than projecting N tokens when L * (W + heads * N) < N * W (`folding_pays`). `x` of batch 1
        is one query set read by every image: its query-keys are computed once and meet all images'
        tokens in one product."""
        batch, (_, length, width) = image.tokens.shape[0], x.shape  # x may be one query set for every image
        key, value = image.folded(self.key), image.folded(self.value)
        dropping = self.training and self.attn_dropout > 0.0
        probs = self._folded_probs(x, image.tokens, *key)  # (B, H*L, N), rows ordered (h, l)
        if dropping:
            probs = dropout(probs, self.attn_dropout)
        out = self._folded_values(probs, image.tokens, length, value[0])  # (B, L, H, Dh)
        value_bias = value[1].view(self.heads, -1)
        if dropping:  # dropped probabilities took their share of the bias with them
            mass = probs.sum(dim=-1).view(batch, self.heads, length).transpose(1, 2)  # (B, L, H)
            out = out + mass.unsqueeze(-1) * value_bias
        else:
            out = out + value_bias
        return self.norm(x + self.dropout(self.dense(out.reshape(batch, length, width))))

    def _folded_probs(self, x: torch.Tensor, tokens: torch.Tensor, key_weight: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        """softmax((q_h Wk_h) tokens^T + q_h . b_k) as (B, H*L, N); a function of its own so that
        the (B, H*L, C) query-keys are freed before the values are mixed."""
        batch, length, width = x.shape
        heads, head_dim, (images, count, context_width) = self.heads, width // self.heads, tokens.shape
        q = self.query(x).view(batch * length, heads, head_dim).transpose(0, 1) * head_dim ** -0.5  # (H, B*L, Dh)
        if batch > 1 and not torch.is_grad_enabled():
            return self._inferred_probs(q.view(heads, batch, length, head_dim), tokens, key_weight)
        q_keys = torch.bmm(q, key_weight.view(heads, head_dim, context_width))  # (H, B*L, C)
        shift = torch.bmm(q, key_bias.view(heads, head_dim, 1))  # (H, B*L, 1)
        if batch == 1 < images:  # one query set: all images' scores in one product, (H*L, I*N) -> (I, H*L, N)
            scores = torch.addmm(shift.view(heads * length, 1), q_keys.view(heads * length, context_width),
                                 tokens.reshape(images * count, context_width).t())
            scores = scores.view(heads * length, images, count).transpose(0, 1)
        else:
            q_keys = q_keys.view(heads, batch, length, context_width).transpose(0, 1).reshape(batch, heads * length, context_width)
            shift = shift.view(heads, batch, length).transpose(0, 1).reshape(batch, heads * length, 1)
            scores = torch.baddbmm(shift, q_keys, tokens.transpose(1, 2))
        return scores.softmax(dim=-1, dtype=torch.float32).to(scores.dtype)  # fp32 softmax, as the eager reference

    @staticmethod
    def _inferred_probs(q: torch.Tensor, tokens: torch.Tensor, key_weight: torch.Tensor) -> torch.Tensor:
        """`_folded_probs` without autograd, for (H, B, L, Dh) queries: each image's query-keys are
        written in image order (no head-order copy of the (B, H*L, C) product), and the key bias is left
        out: it adds the same q . b_k to every score of a row, which the softmax cancels exactly."""
        heads, batch, length, head_dim = q.shape
        weight = key_weight.view(heads, head_dim, -1)
        q_keys = q.new_empty(batch, heads, length, weight.shape[-1])
        for image in range(batch):
            torch.bmm(q[:, image], weight, out=q_keys[image])
        scores = torch.bmm(q_keys.view(batch, heads * length, -1), tokens.transpose(1, 2))
        return scores.softmax(dim=-1, dtype=torch.float32).to(scores.dtype)

    def _folded_values(self, probs: torch.Tensor, tokens: torch.Tensor, length: int, value_weight: torch.Tensor) -> torch.Tensor:
        """(P_h tokens) Wv_h^T for every head, as (B, L, H, Dh) (without the value bias)."""
        batch, context_width = tokens.shape[0], tokens.shape[-1]
        weight = value_weight.view(self.heads, -1, context_width).transpose(1, 2)  # (H, C, Dh)
        mixed = torch.bmm(probs, tokens).view(batch, self.heads, length, context_width).transpose(0, 1).reshape(
            self.heads, batch * length, context_width)  # a copy in head order; the batch-order product dies here
        out = torch.bmm(mixed, weight)  # (H, B*L, Dh)
        return out.view(self.heads, batch, length, -1).permute(1, 2, 0, 3)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        # K/V are computed here and die when attend returns: cross-attention K/V (B, N, W) are the
        # largest activations of an inference pass and must not live on through later layers.
        return self.attend(x, self.key_values(x if context is None else context), mask)


def folding_pays(length: int, tokens: int, width: int, heads: int) -> bool:
    """Whether `Attention.attend_folded` is faster than projecting the tokens: its multiply-adds per
    context feature, length * (width + heads * tokens), at most 3/4 of tokens * width. The margin is
    measured: at BLIP-2 size (32 queries, 257 tokens, width 768, 12 heads; 0.63 of the multiply-adds)
    the folded layers took 0.86 of the time on CPU, its batched matmuls and head-order copies costing
    about a third more per multiply-add than the projections' GEMMs (BENCHMARKS.md)."""
    return 4 * length * (width + heads * tokens) <= 3 * tokens * width


class FeedForward(nn.Module):
    """BERT's FFN with its output block: LN(x + dropout(fc2(gelu(fc1(x)))))."""

    def __init__(self, width: int, hidden: int, eps: float, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.fc2(F.gelu(self.fc1(x)))))


class QFormerLayer(nn.Module):
    """One layer. `num_queries` leading positions are queries (0 for a text-only pass)."""

    def __init__(self, width: int, encoder_width: int, heads: int, hidden: int, eps: float, dropout: float, cross: bool):
        super().__init__()
        self.self_attn = Attention(width, width, heads, eps, dropout)
        self.cross_attn = Attention(width, encoder_width, heads, eps, dropout) if cross else None
        self.ffn_query = FeedForward(width, hidden, eps, dropout)
        self.ffn_text: FeedForward | None = FeedForward(width, hidden, eps, dropout)  # None once the text side is dropped

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, num_queries: int, image: torch.Tensor | KV | None,
                prefix: KV | None = None, keep: list[KV] | None = None, rows: int | None = None) -> torch.Tensor:
        """`image`: ln_vision'd tokens, this layer's cross-attention K/V of them computed once for
        several passes, or `NormedTokens` to read with `attend_folded`. `prefix`: K/V put in front of
        the self-attention's own (ITG's text reading a query pass's). `keep`: a list this layer's
        self-attention K/V are appended to. `rows`: only the first positions' outputs (all positions
        are still keys and values)."""
        kv = self.self_attn.key_values(x)
        if keep is not None:
            keep.append(kv)
        if prefix is not None:
            kv = (torch.cat([prefix[0], kv[0]], dim=2), torch.cat([prefix[1], kv[1]], dim=2))
        if rows is not None:
            x, mask, num_queries = x[:, :rows], None if mask is None else mask[..., :rows, :], min(num_queries, rows)
        x = self.self_attn.attend(x, kv, mask)
        if num_queries == 0:
            return self.ffn_text(x)
        queries, text = x[:, :num_queries], x[:, num_queries:]
        if self.cross_attn is not None:
            queries = self._cross(queries, image)
        queries = self.ffn_query(queries)
        if text.shape[1] == 0:
            return queries
        return torch.cat([queries, self.ffn_text(text)], dim=1)

    def _cross(self, queries: torch.Tensor, image: torch.Tensor | KV | NormedTokens | None) -> torch.Tensor:
        if image is None:
            raise VLBridgeError("a Q-Former pass with queries needs image_embeds for its cross-attention layers")
        if isinstance(image, NormedTokens):
            return self.cross_attn.attend_folded(queries, image)
        queries = queries.expand((image if isinstance(image, torch.Tensor) else image[0]).shape[0], -1, -1)  # a shared query set
        if isinstance(image, torch.Tensor):
            return self.cross_attn(queries, context=image)
        return self.cross_attn.attend(queries, image, None)


class Embeddings(nn.Module):
    """Text: word + absolute position (from 0); queries: no position. LN and dropout on the
    concatenation `[queries ; text]`, as in BLIP-2."""

    def __init__(self, vocab: int, max_positions: int, width: int, eps: float, dropout: float):
        super().__init__()
        self.word: nn.Embedding | None = nn.Embedding(vocab, width, padding_idx=0)
        self.position: nn.Embedding | None = nn.Embedding(max_positions, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.dropout = Dropout(dropout)

    def forward(self, input_ids: torch.Tensor | None = None, queries: torch.Tensor | None = None) -> torch.Tensor:
        parts = [] if queries is None else [queries]
        if input_ids is not None:
            if self.word is None or self.position is None:
                raise VLBridgeError("this Q-Former has no text embeddings (drop_text_side() removed them); text passes need a full Q-Former")
            length = input_ids.shape[1]
            if length > self.position.num_embeddings:
                raise VLBridgeError(f"text of {length} tokens is longer than the Q-Former's {self.position.num_embeddings} positions; truncate it")
            positions = torch.arange(length, device=input_ids.device)
            parts.append(self.word(input_ids) + self.position(positions))
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (B, Q+T, W)
        return self.dropout(self.norm(x))


class LMHead(nn.Module):
    """BERT's MLM head for ITG: dense + GELU + LN, then the word embeddings (tied) and a bias."""

    def __init__(self, width: int, vocab: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, x: torch.Tensor, word_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(F.gelu(self.dense(x))), word_weight, self.bias)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (LAVIS's ln_vision), output cast back."""

    def normalised(self, x: torch.Tensor) -> NormedTokens:
        """`x` normalised without the affine, with the affine beside it (for `attend_folded`)."""
        return NormedTokens(F.layer_norm(x.float(), self.normalized_shape, None, None, self.eps).to(x.dtype), self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)
