"""Retrieval Recall@K with several captions per image, worked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from vlbridge.errors import VLBridgeError
from vlbridge.metrics.retrieval import query_ranks, recall_at_k, retrieval_recall

# 3 images, 5 texts: image 0 owns texts 0 and 1, image 1 texts 2 and 3, image 2 text 4
IMG2TXT = [[0, 1], [2, 3], [4]]
TXT2IMG = [0, 0, 1, 1, 2]
SCORES = [
    [0.1, 0.9, 0.8, 0.2, 0.3],  # image 0: its text 1 is on top                          -> rank 0
    [0.9, 0.8, 0.1, 0.7, 0.6],  # image 1: best own text 3 (0.7), beaten by 0.9 and 0.8   -> rank 2
    [0.5, 0.4, 0.3, 0.2, 0.1],  # image 2: its text 4 is last, beaten by 4                 -> rank 4
]


def test_image_to_text_counts_any_caption():
    assert query_ranks(np.array(SCORES), IMG2TXT) == [0, 2, 4]
    result = retrieval_recall(SCORES, IMG2TXT, TXT2IMG, with_ranks=True)
    # R@1: 1 of 3 images; R@5 and R@10: all three (rank 4 < 5)
    assert result["i2t_r1"] == pytest.approx(100 / 3)
    assert result["i2t_r5"] == result["i2t_r10"] == 100.0
    assert result["i2t_r_mean"] == pytest.approx((100 / 3 + 200) / 3)  # 77.78
    assert result["i2t_ranks"] == [0, 2, 4]


def test_text_to_image_from_the_transposed_itc_matrix():
    # columns of SCORES, each text against the 3 images:
    #   text 0 [0.1, 0.9, 0.5], own image 0 -> rank 2;  text 1 [0.9, 0.8, 0.4] -> rank 0
    #   text 2 [0.8, 0.1, 0.3], own image 1 -> rank 2;  text 3 [0.2, 0.7, 0.2] -> rank 0
    #   text 4 [0.3, 0.6, 0.1], own image 2 -> rank 2
    result = retrieval_recall(SCORES, IMG2TXT, TXT2IMG, with_ranks=True)
    assert result["t2i_ranks"] == [2, 0, 2, 0, 2]
    assert result["t2i_r1"] == pytest.approx(40.0)  # 2 of 5
    assert result["t2i_r5"] == result["t2i_r10"] == 100.0
    assert result["t2i_r_mean"] == pytest.approx(80.0)
    assert result["r_mean"] == pytest.approx(((100 / 3 + 200) / 3 + 80.0) / 2)  # 78.89
    assert result["num_images"] == 3 and result["num_texts"] == 5


def test_separate_reranked_text_to_image_scores():
    # ITM re-ranking gives each direction its own matrix; here every text finds its image first
    t2i = np.full((5, 3), -100.0)
    for text, image in enumerate(TXT2IMG):
        t2i[text, image] = 1.0
    result = retrieval_recall(SCORES, IMG2TXT, TXT2IMG, t2i=t2i)
    assert result["t2i_r1"] == 100.0 and result["i2t_r1"] == pytest.approx(100 / 3)


def test_recall_at_5_and_10_with_more_texts():
    # one image with 12 texts, its own (text 3, 0.35) sits 8th: 0.9 .. 0.45 are 7 wrong texts above it -> rank 7
    scores = np.array([[0.9, 0.8, 0.7, 0.35, 0.6, 0.55, 0.5, 0.45, 0.1, 0.2, 0.3, 0.05]])
    assert query_ranks(scores, [[3]]) == [7]
    assert recall_at_k([7]) == {1: 0.0, 5: 0.0, 10: 100.0}
    assert recall_at_k([0, 4, 7, 10]) == {1: 25.0, 5: 50.0, 10: 75.0}  # rank 10 is the 11th: not within 10


def test_ties_count_against_the_query():
    # a constant scorer must not look good: all 4 wrong texts tie with the right one -> rank 4
    assert query_ranks(np.zeros((1, 5)), [[0]]) == [4]
    # a tie between two right captions does not hurt: only wrong texts are counted
    assert query_ranks(np.array([[1.0, 1.0, 0.0]]), [[0, 1]]) == [0]


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    result = retrieval_recall(torch.tensor(SCORES, dtype=torch.float16), IMG2TXT, TXT2IMG)
    assert result["i2t_r1"] == pytest.approx(100 / 3)


def test_bad_input():
    with pytest.raises(VLBridgeError, match=r"must have shape \(3, 5\)"):
        retrieval_recall(np.zeros((3, 4)), IMG2TXT, TXT2IMG)
    with pytest.raises(VLBridgeError, match="NaN"):
        retrieval_recall(np.full((3, 5), np.nan), IMG2TXT, TXT2IMG)
    with pytest.raises(VLBridgeError, match="txt2img disagrees"):
        retrieval_recall(SCORES, [[0, 1], [2, 4], [3]], TXT2IMG)
    with pytest.raises(VLBridgeError, match="no queries"):
        recall_at_k([])


def test_pairs_outside_an_itm_shortlist_rank_by_itc():
    # 12 images with one caption each; image 0's caption (text 0) is 6th by ITC. ITM re-ranks each
    # row's ITC top 4 and leaves -100 elsewhere: the re-ranking reorders the top 4 only, so text 0
    # stays 6th in the model's ranking and is within the top 10 for ITM as it is for ITC.
    n = 12
    itc = np.random.default_rng(0).uniform(0, 1, (n, n))
    itc[0] = np.linspace(0.9, 0.1, n)
    itc[0, [0, 5]] = itc[0, [5, 0]]
    itm = np.full((n, n), -100.0)
    for i in range(n):
        top = np.argsort(-itc[i])[:4]
        itm[i, top] = itc[i, top] + 1.0
    pairs = [[i] for i in range(n)], list(range(n))
    plain = retrieval_recall(itc, *pairs, with_ranks=True)
    reranked = retrieval_recall(itm, *pairs, t2i=itm.T.copy(), tiebreak=itc, with_ranks=True)
    assert plain["i2t_ranks"][0] == reranked["i2t_ranks"][0] == 5  # not 11: the -100 ties rank by ITC
    for direction in ("i2t", "t2i"):
        assert reranked[f"{direction}_r5"] == plain[f"{direction}_r5"] and reranked[f"{direction}_r10"] == plain[f"{direction}_r10"]
    # ties on both matrices still count against the query
    assert query_ranks(np.zeros((1, 3)), [[0]], np.zeros((1, 3))) == [2]
