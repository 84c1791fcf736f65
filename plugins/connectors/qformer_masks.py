"""The Q-Former's three self-attention masks (BLIP-2 §3.1), as boolean "can see" matrices.

The sequence is `[queries (Q) ; text (T)]`. Each function takes the text padding mask `(B, T)`
(1/True = real token) and returns `(B, 1, Q+T, Q+T)`, True where row i may attend to column j;
padded text keys are never visible. They feed `vlbridge.parts.attention.attention` directly.

- unimodal (ITC): queries see queries, text sees text.
- bidirectional (ITM): everyone sees everyone.
- multimodal-causal (ITG): queries see queries; text sees all queries and itself and earlier text.
  `text_after_queries_mask` is its text rows alone, for a text pass reading a query pass's K/V.
"""

from __future__ import annotations

import torch


def _visible_keys(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, Q+T): which keys exist at all (queries always; text where not padding)."""
    batch = text_mask.shape[0]
    queries = torch.ones(batch, num_queries, dtype=torch.bool, device=text_mask.device)
    return torch.cat([queries, text_mask.bool()], dim=1)[:, None, None, :]


def _is_query(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """(Q+T,): True at query positions."""
    return torch.arange(num_queries + text_mask.shape[1], device=text_mask.device) < num_queries


def unimodal_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """Queries and text do not see each other: the image side and the text side of ITC."""
    is_query = _is_query(num_queries, text_mask)
    same_side = is_query[:, None] == is_query[None, :]  # (L, L)
    return same_side & _visible_keys(num_queries, text_mask)


def bidirectional_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """Every position sees every real position: ITM's joint pass (a broadcast view, no copy)."""
    keys = _visible_keys(num_queries, text_mask)
    length = keys.shape[-1]
    return keys.expand(-1, 1, length, length)


def multimodal_causal_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """Queries see only queries; text row i sees all queries and text up to i: ITG (UniLM-style)."""
    is_query = _is_query(num_queries, text_mask)
    pos = torch.arange(is_query.shape[0], device=text_mask.device)
    not_later = pos[None, :] <= pos[:, None]  # (L, L): key j at or before row i; queries precede text
    allowed = torch.where(is_query[:, None], is_query[None, :], not_later)
    return allowed & _visible_keys(num_queries, text_mask)


def text_after_queries_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, Q+T): the text rows of the multimodal-causal mask, for ITG's text pass whose keys
    are [a query pass's K/V ; its own] (LAVIS's past_key_values)."""
    return multimodal_causal_mask(num_queries, text_mask)[:, :, num_queries:]
