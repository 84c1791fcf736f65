"""Building blocks of the Q-Former: BERT's post-LN layers with BLIP-2's query/text split.

A layer runs self-attention over `[queries ; text]`, then (queries only) cross-attention to the
image in every `cross_attention_freq`-th layer, then a separate FFN for queries and for text.
All attention goes through `vlbridge.attention.attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlbridge.attention import attention
from vlbridge.dropout import Dropout
from vlbridge.errors import VLBridgeError


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

    def _attend(self, x: torch.Tensor, source: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q = self._split_heads(self.query(x))
        k = self._split_heads(self.key(source))
        v = self._split_heads(self.value(source))
        out = attention(q, k, v, mask, dropout_p=self.attn_dropout if self.training else 0.0)
        batch, _, length, _ = out.shape
        return out.transpose(1, 2).reshape(batch, length, -1)  # (B, H, L, Dh) -> (B, L, W)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        # q, k, v die when _attend returns: cross-attention K/V (B, N, W) are the largest
        # activations of an inference pass and must not live on through the output block.
        out = self._attend(x, x if context is None else context, mask)
        return self.norm(x + self.dropout(self.dense(out)))


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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, num_queries: int, image: torch.Tensor | None) -> torch.Tensor:
        x = self.self_attn(x, mask=mask)
        if num_queries == 0:
            return self.ffn_text(x)
        queries, text = x[:, :num_queries], x[:, num_queries:]
        if self.cross_attn is not None:
            if image is None:
                raise VLBridgeError("a Q-Former pass with queries needs image_embeds for its cross-attention layers")
            queries = self.cross_attn(queries, context=image)
        queries = self.ffn_query(queries)
        if text.shape[1] == 0:
            return queries
        return torch.cat([queries, self.ffn_text(text)], dim=1)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)
