"""ROUGE-L (Lin 2004) as the COCO caption evaluation computes it (pycocoevalcap's "Rouge").

Per image, with LCS the longest common subsequence of tokens:
precision_j = LCS(c, s_j) / |c| and recall_j = LCS(c, s_j) / |s_j| for every reference s_j; the best
precision and the best recall are taken *separately* (they may come from different references), and
F = (1 + beta^2) P R / (R + beta^2 P) with beta = 1.2, or 0 when either is 0. The corpus score is
the mean over images. Tokens come from splitting on single spaces, as the reference code does
(tokenised input never has doubled spaces, where that would differ from a whitespace split).
"""

from __future__ import annotations

from typing import Sequence

from vlbridge.metrics.ngrams import check_pairs

BETA = 1.2


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, by dynamic programming over one row."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l_image(candidate: str, references: Sequence[str], beta: float = BETA) -> float:
    cand = candidate.split(" ")
    precisions, recalls = [], []
    for reference in references:
        ref = reference.split(" ")
        common = lcs_length(ref, cand)
        precisions.append(common / len(cand))
        recalls.append(common / len(ref))
    p, r = max(precisions), max(recalls)
    if p == 0 or r == 0:
        return 0.0
    return (1 + beta**2) * p * r / (r + beta**2 * p)


def rouge_l(candidates: Sequence[str], references: Sequence[Sequence[str]], beta: float = BETA) -> tuple[float, list[float]]:
    """Mean ROUGE-L F over images and the per-image scores; inputs are tokenised, space-joined strings."""
    check_pairs(candidates, references, "ROUGE-L")
    scores = [rouge_l_image(c, refs, beta) for c, refs in zip(candidates, references)]
    return sum(scores) / len(scores), scores
