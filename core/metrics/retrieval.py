"""Image-text retrieval Recall@K as BLIP/BLIP-2 report it (LAVIS ``itm_eval``), percent:

- image->text (LAVIS's ``txt_r{K}``): an image is a hit when ANY of its captions ranks within the top K
  of its score row;
- text->image (LAVIS's ``img_r{K}``): a caption is a hit when its one image ranks within the top K;
- ``i2t_r_mean`` / ``t2i_r_mean`` average R@1, R@5, R@10; ``r_mean`` averages the two.

This is the hit rate, not torchmetrics' RetrievalRecall (found / all relevant), which would cap
image->text R@1 at 0.2 with 5 captions per image.

Ties: a query's rank is the number of wrong items scoring at least as high as its best right item,
so ties count against the query (a constant scorer gets 0, not a lucky sort order).
Scores may be nested lists, numpy arrays or CPU/GPU torch tensors; torch is not imported here.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from vlbridge.errors import VLBridgeError

KS = (1, 5, 10)


def as_matrix(scores: Any, rows: int, cols: int, what: str) -> np.ndarray:
    """A (rows, cols) float64 array, whatever array type came in; NaN is an error."""
    if hasattr(scores, "detach"):  # a torch tensor, maybe on a GPU, maybe half precision
        scores = scores.detach().float().cpu().numpy()
    array = np.asarray(scores, dtype=np.float64)
    if array.shape != (rows, cols):
        raise VLBridgeError(f"{what} scores must have shape ({rows}, {cols}), got {array.shape}")
    if np.isnan(array).any():
        raise VLBridgeError(f"{what} scores contain NaN")
    return array


def query_ranks(scores: np.ndarray, positives: Sequence[Sequence[int]]) -> list[int]:
    """0-based rank of each row's best positive column: wrong columns scoring at least as high."""
    ranks = []
    for row, cols in zip(scores, positives):
        if len(cols) == 0:
            raise VLBridgeError("every query needs at least one correct item")
        wrong = np.ones(row.shape[0], dtype=bool)
        wrong[list(cols)] = False
        best = row[list(cols)].max()
        ranks.append(int((row[wrong] >= best).sum()))
    return ranks


def recall_at_k(ranks: Sequence[int], ks: Sequence[int] = KS) -> dict[int, float]:
    """Percent of queries whose rank is below K, for each K."""
    if not ranks:
        raise VLBridgeError("Recall@K: no queries")
    ranks_array = np.asarray(ranks)
    return {k: float(100.0 * (ranks_array < k).mean()) for k in ks}


def check_maps(img2txt: Sequence[Sequence[int]], txt2img: Sequence[int]) -> None:
    """img2txt and txt2img must describe the same assignment of texts to images."""
    for i, texts in enumerate(img2txt):
        for t in texts:
            if not 0 <= t < len(txt2img) or txt2img[t] != i:
                raise VLBridgeError(f"img2txt says text {t} belongs to image {i}, but txt2img disagrees")
    if sum(len(texts) for texts in img2txt) != len(txt2img):
        raise VLBridgeError("img2txt must list every text exactly once")


def retrieval_recall(i2t: Any, img2txt: Sequence[Sequence[int]], txt2img: Sequence[int], t2i: Any = None,
                     ks: Sequence[int] = KS, with_ranks: bool = False) -> dict[str, Any]:
    """R@K both ways and their means from an (images x texts) score matrix, and optionally a separate
    (texts x images) one (ITM re-ranked scores differ per direction; ITC scores are one matrix)."""
    check_maps(img2txt, txt2img)
    num_images, num_texts = len(img2txt), len(txt2img)
    i2t_scores = as_matrix(i2t, num_images, num_texts, "image->text")
    t2i_scores = i2t_scores.T if t2i is None else as_matrix(t2i, num_texts, num_images, "text->image")
    i2t_ranks = query_ranks(i2t_scores, img2txt)
    t2i_ranks = query_ranks(t2i_scores, [[image] for image in txt2img])
    result: dict[str, Any] = {}
    for name, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        recalls = recall_at_k(ranks, ks)
        result.update({f"{name}_r{k}": value for k, value in recalls.items()})
        result[f"{name}_r_mean"] = sum(recalls.values()) / len(recalls)
    result["r_mean"] = (result["i2t_r_mean"] + result["t2i_r_mean"]) / 2
    result["num_images"], result["num_texts"] = num_images, num_texts
    if with_ranks:
        result["i2t_ranks"], result["t2i_ranks"] = i2t_ranks, t2i_ranks
    return result
