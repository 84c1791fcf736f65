"""BLEU-1..4 as the COCO caption evaluation reports it (Papineni et al. 2002, corpus level).

Conventions that decide the numbers, matched to pycocoevalcap's ``Bleu(4)``:

- clipped n-gram matches: a candidate n-gram counts at most as often as it appears in the one
  reference that has it most often;
- corpus BLEU-n = (prod_{k<=n} p_k)^(1/n) with p_k = (matches_k + 1e-15) / (candidate n-grams_k + 1e-9)
  summed over all images (the tiny constants keep a zero from becoming log(0));
- brevity penalty exp(1 - r/c) when c < r, where c is the total candidate length and r the sum over
  images of the reference length *closest* to that image's candidate (a tie goes to the shorter);
  the ratio c/r carries the same 1e-15 / 1e-9 constants;
- the per-image scores use the same formulas on one image alone.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from vlbridge.metrics.ngrams import NGram, check_pairs, ngram_counts

TINY, SMALL = 1e-15, 1e-9


@dataclass
class _Stats:
    """Sufficient statistics of one image (or, summed, of the corpus)."""

    cand_len: int = 0
    ref_len: int = 0
    guesses: list[int] = field(default_factory=list)
    matches: list[int] = field(default_factory=list)


def closest_length(ref_lengths: Sequence[int], cand_len: int) -> int:
    """The reference length nearest the candidate's; the shorter one on a tie."""
    return min(ref_lengths, key=lambda length: (abs(length - cand_len), length))


def image_stats(candidate: str, references: Sequence[str], max_n: int = 4) -> _Stats:
    cand_len = len(candidate.split())
    best_ref: Counter[NGram] = Counter()
    for ref in references:
        for gram, count in ngram_counts(ref, max_n).items():
            best_ref[gram] = max(best_ref[gram], count)
    matches = [0] * max_n
    for gram, count in ngram_counts(candidate, max_n).items():
        matches[len(gram) - 1] += min(count, best_ref.get(gram, 0))
    guesses = [max(0, cand_len - k) for k in range(max_n)]
    ref_len = closest_length([len(r.split()) for r in references], cand_len)
    return _Stats(cand_len, ref_len, guesses, matches)


def bleu_from_stats(stats: _Stats) -> list[float]:
    """BLEU-1..n from (summed) statistics, with the smoothing constants and brevity penalty above."""
    scores, product = [], 1.0
    for k, (match, guess) in enumerate(zip(stats.matches, stats.guesses)):
        product *= (match + TINY) / (guess + SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (stats.cand_len + TINY) / (stats.ref_len + SMALL)
    if ratio < 1:
        penalty = math.exp(1 - 1 / ratio)
        scores = [s * penalty for s in scores]
    return scores


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> tuple[list[float], list[list[float]]]:
    """Corpus BLEU-1..max_n and, per image, the same scores for that image alone.

    Inputs are tokenised, space-joined strings: one candidate and a list of references per image.
    """
    check_pairs(candidates, references, "BLEU")
    total = _Stats(guesses=[0] * max_n, matches=[0] * max_n)
    per_image = []
    for candidate, refs in zip(candidates, references):
        stats = image_stats(candidate, refs, max_n)
        per_image.append(bleu_from_stats(stats))
        total.cand_len += stats.cand_len
        total.ref_len += stats.ref_len
        total.guesses = [a + b for a, b in zip(total.guesses, stats.guesses)]
        total.matches = [a + b for a, b in zip(total.matches, stats.matches)]
    return bleu_from_stats(total), per_image
