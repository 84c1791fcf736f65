"""N-gram counting and input checks shared by BLEU and CIDEr-D (both count on whitespace tokens)."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from vlbridge.errors import VLBridgeError

NGram = tuple[str, ...]


def ngram_counts(text: str, max_n: int) -> Counter[NGram]:
    """Every n-gram of the whitespace tokens for n = 1..max_n, with its raw count."""
    words = text.split()
    counts: Counter[NGram] = Counter()
    for n in range(1, max_n + 1):
        for start in range(len(words) - n + 1):
            counts[tuple(words[start:start + n])] += 1
    return counts


def check_pairs(candidates: Sequence[str], references: Sequence[Sequence[str]], metric: str) -> None:
    """One candidate string and at least one reference string per image, for at least one image."""
    if len(candidates) != len(references):
        raise VLBridgeError(f"{metric}: {len(candidates)} candidates but {len(references)} reference sets; give one of each per image")
    if not candidates:
        raise VLBridgeError(f"{metric}: nothing to score (no images)")
    for i, (candidate, refs) in enumerate(zip(candidates, references)):
        if not isinstance(candidate, str):
            raise VLBridgeError(f"{metric}: image {i}: the candidate must be one string, got {type(candidate).__name__}")
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise VLBridgeError(f"{metric}: image {i}: references must be a non-empty list of strings")
