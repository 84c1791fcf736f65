"""Texts as int64 keys, so that "is this text one of that image's captions?" is a tensor comparison
that can be gathered across ranks with the rest of a stage-1 batch (`losses.caption_positives`).

A key is the first 63 bits of the text's BLAKE2b digest: the same on every rank and every run
(Python's `hash` of a str is salted per process), non-negative so that NO_CAPTION pads rows.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from vlbridge.errors import VLBridgeError
from vlbridge.train.distributed import all_gather_no_grad, max_over_ranks
from vlbridge.train.losses import NO_CAPTION


def text_key(text: str) -> int:
    """A stable non-negative 63-bit key of a text (exact string: the data layer has already cleaned it)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") & (2**63 - 1)


def text_keys(texts: Sequence[str], device: torch.device) -> torch.Tensor:
    """(B,) int64 keys of the batch's texts."""
    return torch.tensor([text_key(text) for text in texts], dtype=torch.long, device=device)


def caption_key_rows(image_captions: Sequence[Sequence[str]], device: torch.device) -> torch.Tensor:
    """(B, K) int64 keys of each sample's image's captions, padded with NO_CAPTION to the widest row of
    every rank (so that the rows can be gathered)."""
    if any(isinstance(captions, str) or not all(isinstance(c, str) for c in captions) for captions in image_captions):
        raise VLBridgeError("batch['image_captions'] must hold one list of caption strings per sample (its image's captions)")
    width = max_over_ranks(max((len(captions) for captions in image_captions), default=1), device)
    rows = torch.full((len(image_captions), max(width, 1)), NO_CAPTION, dtype=torch.long)
    for row, captions in enumerate(image_captions):
        if captions:
            rows[row, : len(captions)] = torch.tensor([text_key(c) for c in captions], dtype=torch.long)
    return rows.to(device)


def gathered_caption_keys(texts: Sequence[str], image_captions: Sequence[Sequence[str]], device: torch.device
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's text keys (B,) and caption-key rows (B, K), and every rank's (N,) and (N, K)."""
    keys, rows = text_keys(texts, device), caption_key_rows(image_captions, device)
    return keys, rows, all_gather_no_grad(keys), all_gather_no_grad(rows)
