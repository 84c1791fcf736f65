"""CIDEr-D (Vedantam et al. 2015) as the COCO caption evaluation computes it (pycocoevalcap's "Cider").

For N images, each with one candidate c and references S:

- n-grams n = 1..4 with raw counts as term frequencies (not normalised);
- document frequency df(g) = how many images' reference sets contain g, from the references being
  scored only (so a subset of a split gets different IDF weights: score all images at once);
- weight w(g) = tf(g) * (log N - log max(1, df(g))): unseen n-grams get the largest weight, adding to
  the candidate's norm but never to the match, which penalises invented words;
- per n and per reference: sum_g min(w_c(g), w_s(g)) * w_s(g) / (|w_c| |w_s|) (the clipping of "-D"),
  times exp(-delta^2 / (2 sigma^2)), sigma = 6; delta is the length difference counted in *bigrams*
  (words - 1), a quirk of the reference code kept here because it changes one-word captions;
- per image: mean over n, summed over references, divided by their number, times 10;
- corpus: the mean over images.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from vlbridge.metrics.ngrams import NGram, check_pairs, ngram_counts

MAX_N, SIGMA, SCALE = 4, 6.0, 10.0


@dataclass
class _Vector:
    """TF-IDF weights of one sentence, per n-gram order, with their norms and the length used by delta."""

    weights: list[dict[NGram, float]]
    norms: list[float]
    length: int


def document_frequency(reference_counts: Sequence[Sequence[Counter[NGram]]]) -> Counter[NGram]:
    """df(g): the number of images whose references contain g at least once."""
    df: Counter[NGram] = Counter()
    for refs in reference_counts:
        df.update(set().union(*(set(counts) for counts in refs)))
    return df


def _vectorise(counts: Counter[NGram], df: Counter[NGram], log_images: float, max_n: int) -> _Vector:
    weights: list[dict[NGram, float]] = [{} for _ in range(max_n)]
    squares = [0.0] * max_n
    length = 0
    for gram, tf in counts.items():
        order = len(gram) - 1
        weight = tf * (log_images - math.log(max(1.0, df.get(gram, 0))))
        weights[order][gram] = weight
        squares[order] += weight * weight
        if order == 1:  # the reference code's length counts bigrams
            length += tf
    return _Vector(weights, [math.sqrt(s) for s in squares], length)


def _similarity(cand: _Vector, ref: _Vector, sigma: float) -> list[float]:
    delta = cand.length - ref.length
    penalty = math.exp(-(delta * delta) / (2 * sigma * sigma))
    values = []
    for order, cand_weights in enumerate(cand.weights):
        ref_weights = ref.weights[order]
        value = sum(min(w, ref_weights.get(g, 0.0)) * ref_weights.get(g, 0.0) for g, w in cand_weights.items())
        if cand.norms[order] != 0 and ref.norms[order] != 0:
            value /= cand.norms[order] * ref.norms[order]
        values.append(value * penalty)
    return values


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = MAX_N,
            sigma: float = SIGMA) -> tuple[float, list[float]]:
    """Corpus CIDEr-D and the per-image scores; inputs are tokenised, space-joined strings."""
    check_pairs(candidates, references, "CIDEr-D")
    ref_counts = [[ngram_counts(r, max_n) for r in refs] for refs in references]
    df = document_frequency(ref_counts)
    log_images = math.log(float(len(candidates)))
    scores = []
    for candidate, refs in zip(candidates, ref_counts):
        cand = _vectorise(ngram_counts(candidate, max_n), df, log_images, max_n)
        total = [0.0] * max_n
        for counts in refs:
            sims = _similarity(cand, _vectorise(counts, df, log_images, max_n), sigma)
            total = [a + b for a, b in zip(total, sims)]
        scores.append(sum(total) / max_n / len(refs) * SCALE)
    return sum(scores) / len(scores), scores
