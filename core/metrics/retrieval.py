"""Image-text retrieval Recall@K as BLIP/BLIP-2 report it (LAVIS ``itm_eval``), percent:

- image->text (LAVIS's ``txt_r{K}``): an image is a hit when ANY of its captions ranks within the top K
  of its score row;
- text->image (LAVIS's ``img_r{K}``): a caption is a hit when its one image ranks within the top K;
- ``i2t_r_mean`` / ``t2i_r_mean`` average R@1, R@5, R@10; ``r_mean`` averages the two.

This is the hit rate, not torchmetrics' RetrievalRecall (found / all relevant), which would cap
image->text R@1 at 0.2 with 5 captions per image.

Ties: a query's rank is the number of wrong items scoring at least as high as its best right item,
so ties count against the query (a constant scorer gets 0, not a lucky sort order).

ITM re-ranked scores hold -100 for every pair outside a query's ITC shortlist; those ties are broken
by a second matrix (`tiebreak`, the ITC scores), as the model's own ranking orders them: the shortlist
first, then the rest by ITC. Without it, a right item ranked 6th by ITC would count as last, and with
a shortlist shorter than K, ITM's R@K would fall below ITC's although re-ranking only reorders the shortlist.
Scores may be nested lists, numpy arrays or CPU/GPU torch tensors; torch is not imported here.
"""

from __future__ import annotations

from typing import Any, Hashable, Sequence

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


def query_ranks(scores: np.ndarray, positives: Sequence[Sequence[int]], tiebreak: np.ndarray | None = None) -> list[int]:
    """0-based rank of each row's best positive column: wrong columns scoring at least as high.

    With `tiebreak` (same shape), columns are compared by (score, tiebreak): a wrong column that ties
    the best positive on `scores` counts only if it also scores at least as high on `tiebreak`.
    """
    ranks = []
    for r, (row, cols) in enumerate(zip(scores, positives)):
        if len(cols) == 0:
            raise VLBridgeError("every query needs at least one correct item")
        cols = list(cols)
        wrong = np.ones(row.shape[0], dtype=bool)
        wrong[cols] = False
        if tiebreak is None:
            ranks.append(int((row[wrong] >= row[cols].max()).sum()))
            continue
        second = tiebreak[r]
        best = max(cols, key=lambda c: (row[c], second[c]))
        above = (row[wrong] > row[best]) | ((row[wrong] == row[best]) & (second[wrong] >= second[best]))
        ranks.append(int(above.sum()))
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


def right_items(img2txt: Sequence[Sequence[int]], txt2img: Sequence[int],
                image_keys: Sequence[Hashable] | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """The right texts of each image and the right images of each text. Images with equal keys are
    interchangeable (a text of one is true of all: identical scenes, vlbridge.evaluation.scenes);
    without keys, an image's own texts and a text's own image, as BLIP-2 scores."""
    if image_keys is None:
        return [list(texts) for texts in img2txt], [[image] for image in txt2img]
    if len(image_keys) != len(img2txt):
        raise VLBridgeError(f"{len(image_keys)} image keys for {len(img2txt)} images; give one per image")
    same: dict[Hashable, list[int]] = {}
    for image, key in enumerate(image_keys):
        same.setdefault(key, []).append(image)
    image_pos = [sorted(t for j in same[key] for t in img2txt[j]) for key in image_keys]
    return image_pos, [same[image_keys[image]] for image in txt2img]


def retrieval_recall(i2t: Any, img2txt: Sequence[Sequence[int]], txt2img: Sequence[int], t2i: Any = None,
                     ks: Sequence[int] = KS, with_ranks: bool = False, tiebreak: Any = None,
                     image_keys: Sequence[Hashable] | None = None) -> dict[str, Any]:
    """R@K both ways and their means from an (images x texts) score matrix, and optionally a separate
    (texts x images) one (ITM re-ranked scores differ per direction; ITC scores are one matrix).

    `tiebreak`: an (images x texts) matrix ordering what the scores tie, in both directions; pass the
    ITC scores with ITM re-ranked ones, so pairs outside the shortlist (all -100) rank by ITC.
    `image_keys`: one per image; images with equal keys count each other's texts as right (`right_items`).
    """
    check_maps(img2txt, txt2img)
    num_images, num_texts = len(img2txt), len(txt2img)
    i2t_scores = as_matrix(i2t, num_images, num_texts, "image->text")
    t2i_scores = i2t_scores.T if t2i is None else as_matrix(t2i, num_texts, num_images, "text->image")
    second = None if tiebreak is None else as_matrix(tiebreak, num_images, num_texts, "tie-break")
    image_pos, text_pos = right_items(img2txt, txt2img, image_keys)
    i2t_ranks = query_ranks(i2t_scores, image_pos, second)
    t2i_ranks = query_ranks(t2i_scores, text_pos, None if second is None else second.T)
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
