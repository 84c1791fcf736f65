"""vlbridge.train.losses and vlbridge.train.distributed: every loss against numbers worked out by hand
(explicit exp/log sums), hard-negative edge cases, the prefix-LM split, and the gathers in one
process and in two gloo processes."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlbridge.errors import VLBridgeError
from vlbridge.train import distributed
from vlbridge.train.losses import (NO_CAPTION, Positives, caption_positives, image_positives, itc_loss, itg_loss, itm_loss,
                                   negative_weights, positive_mask, prefix_lm_split, sample_hard_negatives, soft_targets, split_point)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def log_softmax_row(row: list[float]) -> list[float]:
    norm = math.log(sum(math.exp(x) for x in row))
    return [x - norm for x in row]


def soft_ce_row(row: list[float], target: list[float]) -> float:
    return -sum(t * lp for t, lp in zip(target, log_softmax_row(row)))


# Two images with two queries each, two texts; E = 2.
IMAGES = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [-1.0, 0.0]]])  # (B=2, Q=2, E=2), unit rows
TEXTS = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # (B=2, E=2)
# Best query per pair: sim_i2t = [[1, 1], [0.6, 0.8]]; sim_t2i[text t, image j] = [[1, 0.6], [1, 0.8]].
SIM_I2T = [[1.0, 1.0], [0.6, 0.8]]
SIM_T2I = [[1.0, 0.6], [1.0, 0.8]]


# -- ITC ------------------------------------------------------------------------------------------

def test_itc_unique_ids_is_diagonal_ce_with_label_smoothing_by_hand():
    temp = 0.5
    loss, sim_i2t, sim_t2i = itc_loss(IMAGES, TEXTS, torch.tensor(temp), torch.tensor([10, 11]))
    assert torch.allclose(sim_i2t, torch.tensor(SIM_I2T) / temp)
    assert torch.allclose(sim_t2i, torch.tensor(SIM_T2I) / temp)
    # label smoothing 0.1 over N = 2 columns: 0.9 + 0.05 on the diagonal, 0.05 elsewhere
    targets = [[0.95, 0.05], [0.05, 0.95]]
    i2t = sum(soft_ce_row([s / temp for s in SIM_I2T[b]], targets[b]) for b in range(2)) / 2
    t2i = sum(soft_ce_row([s / temp for s in SIM_T2I[b]], targets[b]) for b in range(2)) / 2
    assert loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)
    diag = torch.arange(2)
    torch_ce = (F.cross_entropy(sim_i2t, diag, label_smoothing=0.1) + F.cross_entropy(sim_t2i, diag, label_smoothing=0.1)) / 2
    assert loss.item() == pytest.approx(torch_ce.item(), rel=1e-6)


def test_itc_same_image_captions_share_the_positive_mass_by_hand():
    # three captions, the first two of one image: row 0 and 1 have two positives
    images = IMAGES[[0, 0, 1]]  # (3, 2, 2): captions 0 and 1 have the same image
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    ids = torch.tensor([7, 7, 3])
    loss, sim_i2t, sim_t2i = itc_loss(images, texts, 1.0, ids)
    pos, neg = 0.9 / 2 + 0.1 / 3, 0.1 / 3
    targets = [[pos, pos, neg], [pos, pos, neg], [neg, neg, 0.9 + 0.1 / 3]]
    expected = sum(soft_ce_row(sim_i2t[b].tolist(), targets[b]) + soft_ce_row(sim_t2i[b].tolist(), targets[b]) for b in range(3)) / 6
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(soft_targets(positive_mask(ids, ids), 0.1), torch.tensor(targets))


def test_itc_does_not_push_same_image_captions_apart():
    """Captions 0 and 1 describe one image and match it equally: with the same image id the loss
    has nothing to change in their similarity; with distinct ids it pushes caption 1 away from image 0."""
    e0, e1 = [1.0, 0.0], [0.0, 1.0]
    images = torch.tensor([[e0], [e0], [e1]], requires_grad=True)  # (3, Q=1, 2): captions 0 and 1 share an image
    texts = torch.tensor([e0, e0, e1])

    def grad_image0_caption1(ids: list[int]) -> float:
        loss, sim_i2t, _ = itc_loss(images, texts, 0.1, torch.tensor(ids), label_smoothing=0.0)
        sim_i2t.retain_grad()
        loss.backward()
        return sim_i2t.grad[0, 1].item()

    assert abs(grad_image0_caption1([4, 4, 5])) < 1e-4  # (the third column keeps a sliver of probability)
    # distinct ids: (p - target) / (2 directions x 3 rows) = (0.5 - 0) / 6, descent lowers the similarity
    assert grad_image0_caption1([4, 6, 5]) == pytest.approx(0.5 / 6, rel=1e-3)


def test_itc_gradients_reach_both_sides_and_temperature():
    images = F.normalize(torch.randn(3, 4, 8), dim=-1).requires_grad_(True)
    texts = F.normalize(torch.randn(3, 8), dim=-1).requires_grad_(True)
    temp = torch.nn.Parameter(torch.tensor(0.07))
    loss, _, _ = itc_loss(images, texts, temp, torch.arange(3))
    loss.backward()
    assert images.grad.abs().sum() > 0 and texts.grad.abs().sum() > 0 and temp.grad.abs() > 0


def test_itc_temperature_clamp_is_straight_through():
    ids = torch.tensor([0, 1])
    tiny = torch.nn.Parameter(torch.tensor(1e-5))
    clamped, _, _ = itc_loss(IMAGES, TEXTS, tiny, ids)
    at_bound, _, _ = itc_loss(IMAGES, TEXTS, torch.tensor(0.001), ids)
    assert clamped.item() == pytest.approx(at_bound.item(), rel=1e-6)
    clamped.backward()
    assert tiny.grad is not None and tiny.grad.item() != 0  # not stuck below the bound
    _, sim, _ = itc_loss(IMAGES, TEXTS, torch.tensor(1e-5), ids, temp_range=None)
    assert torch.allclose(sim, torch.tensor(SIM_I2T) / 1e-5)


def test_itc_rejects_string_or_float_ids():
    with pytest.raises(VLBridgeError, match="integer"):
        itc_loss(IMAGES, TEXTS, 0.07, torch.tensor([1.0, 2.0]))
    with pytest.raises(VLBridgeError, match="integer"):
        itc_loss(IMAGES, TEXTS, 0.07, ["a", "b"])  # type: ignore[arg-type]


# -- hard negatives -------------------------------------------------------------------------------

def test_negative_weights_are_the_softmax_over_non_positives_by_hand():
    sim = torch.tensor([[5.0, 1.0, 2.0], [3.0, 0.0, 3.0]])
    positives = torch.tensor([[True, False, False], [False, True, False]])
    weights, has_any = negative_weights(sim, positives)
    e1, e2 = math.exp(1.0), math.exp(2.0)
    assert weights[0].tolist() == pytest.approx([0.0, e1 / (e1 + e2), e2 / (e1 + e2)])
    assert weights[1].tolist() == pytest.approx([0.5, 0.0, 0.5])
    assert has_any.all()


def test_hard_negatives_never_pick_a_positive():
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])  # repeated images
    for _ in range(50):
        sim = torch.randn(8, 8, generator=gen) * 5
        sim = sim + 100 * positive_mask(ids, ids)  # positives are by far the most similar
        neg = sample_hard_negatives(sim, sim.T.contiguous(), ids, generator=gen)
        assert neg.has_image.all() and neg.has_text.all()
        assert (ids[neg.images] != ids).all() and (ids[neg.texts] != ids).all()


def test_hard_negatives_follow_the_similarities():
    sim = torch.tensor([[0.0, 4.0, 0.0, 0.0]]).repeat(4, 1)  # column 1 is the hardest
    ids = torch.tensor([0, 1, 2, 3])
    gen = torch.Generator().manual_seed(1)
    draws = torch.stack([sample_hard_negatives(sim, sim, ids, generator=gen).texts for _ in range(400)])
    share = (draws[:, 0] == 1).float().mean().item()
    expected = math.exp(4) / (math.exp(4) + 2)  # row 0: columns 1, 2, 3 are negatives
    assert share == pytest.approx(expected, abs=0.05)
    assert (draws[:, 1] != 1).all()  # row 1: column 1 is its positive


def test_hard_negatives_survive_nan_and_inf_rows():
    ids = torch.tensor([0, 1, 2, 3])
    sim = torch.zeros(4, 4)
    sim[0] = float("nan")  # whole row NaN -> uniform over 1, 2, 3
    sim[1, :] = float("-inf")  # every similarity -inf -> uniform over 0, 2, 3
    sim[2, 3] = float("inf")  # one +inf -> always that one
    sim[3, 0] = float("nan")  # one NaN in a finite row -> never drawn
    weights, has_any = negative_weights(sim, positive_mask(ids, ids))
    assert weights[0].tolist() == pytest.approx([0, 1 / 3, 1 / 3, 1 / 3])
    assert weights[1].tolist() == pytest.approx([1 / 3, 0, 1 / 3, 1 / 3])
    assert weights[2].tolist() == pytest.approx([0, 0, 0, 1])
    assert weights[3].tolist() == pytest.approx([0, 0.5, 0.5, 0])
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        neg = sample_hard_negatives(sim, sim, ids, generator=gen)
        assert (ids[neg.texts] != ids).all() and neg.texts[2] == 3 and neg.texts[3] != 0


def test_hard_negatives_with_a_single_image_flag_every_sample():
    ids = torch.tensor([5, 5, 5])
    neg = sample_hard_negatives(torch.randn(3, 3), torch.full((3, 3), float("nan")), ids)
    assert neg.images.tolist() == [-1, -1, -1] and neg.texts.tolist() == [-1, -1, -1]
    assert not neg.has_image.any() and not neg.has_text.any()


def test_hard_negatives_are_reproducible_with_a_generator():
    sim, ids = torch.randn(6, 6), torch.arange(6)
    first = sample_hard_negatives(sim, sim, ids, generator=torch.Generator().manual_seed(3))
    second = sample_hard_negatives(sim, sim, ids, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first.images, second.images) and torch.equal(first.texts, second.texts)


# -- ITM ------------------------------------------------------------------------------------------

def ce_row(logits: list[float], label: int) -> float:
    return -log_softmax_row(logits)[label]


def test_itm_loss_by_hand():
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.5, -0.5]])  # B = 1: pos, (neg_img, txt), (img, neg_txt)
    expected = (ce_row([0.0, 1.0], 1) + ce_row([2.0, 0.0], 0) + ce_row([0.5, -0.5], 0)) / 3
    assert itm_loss(logits, 1).item() == pytest.approx(expected, rel=1e-6)
    # the second negative has no real negative: it leaves the mean
    masked = itm_loss(logits, 1, torch.tensor([True, False]))
    assert masked.item() == pytest.approx((ce_row([0.0, 1.0], 1) + ce_row([2.0, 0.0], 0)) / 2, rel=1e-6)


def test_itm_loss_labels_layout_for_b2():
    logits = torch.zeros(6, 2)
    logits[:2, 1] = 10.0  # positives say "match", negatives say "no match": near-zero loss
    logits[2:, 0] = 10.0
    assert itm_loss(logits, 2).item() < 1e-3
    with pytest.raises(VLBridgeError, match=r"\(6, 2\)"):
        itm_loss(torch.zeros(4, 2), 2)


# -- ITG ------------------------------------------------------------------------------------------

def test_itg_loss_shifts_ignores_pad_and_smooths_by_hand():
    dec = 9
    ids = torch.tensor([[dec, 2, 1, 0], [dec, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    logits = torch.randn(2, 4, 3)
    loss = itg_loss(logits, ids, mask, label_smoothing=0.1)
    # targets: row 0 predicts 2 (from position 0) and 1 (from 1); row 1 predicts 1 (from 0); pads ignored
    terms = []
    for b, t, label in [(0, 0, 2), (0, 1, 1), (1, 0, 1)]:
        logp = log_softmax_row(logits[b, t].tolist())
        terms.append(0.9 * -logp[label] + 0.1 * -sum(logp) / 3)
    assert loss.item() == pytest.approx(sum(terms) / 3, rel=1e-5)


def test_itg_loss_never_reads_the_last_logit_or_padded_targets():
    ids = torch.tensor([[9, 2, 1, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    logits = torch.randn(1, 4, 3)
    changed = logits.clone()
    changed[0, 2:] += 100.0  # position 2 predicts a pad, position 3 predicts nothing
    assert itg_loss(logits, ids, mask).item() == pytest.approx(itg_loss(changed, ids, mask).item())
    no_smoothing = itg_loss(logits, ids, mask, label_smoothing=0.0)
    expected = (-log_softmax_row(logits[0, 0].tolist())[2] - log_softmax_row(logits[0, 1].tolist())[1]) / 2
    assert no_smoothing.item() == pytest.approx(expected, rel=1e-5)


# -- prefix LM split ------------------------------------------------------------------------------

def test_prefix_split_bounds_in_words():
    gen = torch.Generator().manual_seed(0)
    seen: dict[int, set[int]] = {}
    for _ in range(40):
        for n in range(2, 9):
            words = [f"w{i}" for i in range(n)]
            (prefix, target), = prefix_lm_split([" ".join(words)], gen)
            cut = len(prefix.split())
            assert 1 <= cut <= n // 2 and len(target.split()) >= cut
            assert prefix.split() + target.split() == words
            seen.setdefault(n, set()).add(cut)
    assert seen[6] == {1, 2, 3} and seen[3] == {1}  # every cut from 1 to the middle occurs


def test_prefix_split_short_texts_and_token_lists():
    assert prefix_lm_split(["dog", ""]) == [("", "dog"), ("", "")]
    gen = torch.Generator().manual_seed(1)
    (prefix, target), = prefix_lm_split([[5, 6, 7, 8, 9]], gen)
    assert 1 <= len(prefix) <= 2 and prefix + target == [5, 6, 7, 8, 9]
    assert split_point(1) == 0 and split_point(0) == 0
    again = prefix_lm_split(["a b c d e f g h"], torch.Generator().manual_seed(4))
    assert again == prefix_lm_split(["a b c d e f g h"], torch.Generator().manual_seed(4))


# -- distributed ----------------------------------------------------------------------------------

def test_single_process_gathers_are_identities():
    x = torch.randn(3, 2, requires_grad=True)
    assert not distributed.is_distributed() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.all_gather_with_grad(x) is x
    assert distributed.all_gather_no_grad(x, keep_local=True) is x
    detached = distributed.all_gather_no_grad(x)
    assert torch.equal(detached, x) and not detached.requires_grad
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]


def test_importing_train_modules_needs_no_torch():
    code = ("import sys, vlbridge.train, vlbridge.train.distributed; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]


def _gloo_worker(rank: int, store: str) -> None:
    """Two ranks with 1 and 2 rows (unequal sizes), then an ITC batch split in halves."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(4, 3, 8, generator=gen), dim=-1)
    texts = F.normalize(torch.randn(4, 8, generator=gen), dim=-1)
    ids = torch.tensor([0, 1, 1, 2])
    whole, whole_sim, _ = itc_loss(images, texts, 0.07, ids)  # one process, the whole batch
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        assert distributed.is_distributed() and distributed.rank() == rank and distributed.world_size() == 2
        full = torch.arange(6.0).reshape(3, 2)  # rank 0 holds row 0, rank 1 rows 1-2
        rows = slice(0, 1) if rank == 0 else slice(1, 3)
        local = full[rows].clone().requires_grad_(True)
        assert torch.equal(distributed.all_gather_no_grad(local), full)
        assert distributed.all_gather_object(rank * 10) == [0, 10]
        weights = torch.full((3, 2), float(rank + 1))  # rank 0 weighs by 1, rank 1 by 2
        (distributed.all_gather_no_grad(local, keep_local=True) * weights).sum().backward()
        assert torch.equal(local.grad, weights[rows])  # only this rank's own use
        local.grad = None
        (distributed.all_gather_with_grad(local) * weights).sum().backward()
        assert torch.equal(local.grad, torch.full_like(local, 3.0))  # 1 + 2: both ranks' uses, summed
        assert torch.equal(distributed.all_gather_no_grad(torch.tensor([rank == 0])), torch.tensor([True, False]))
        half = slice(2 * rank, 2 * rank + 2)  # each rank holds half of the batch
        loss, sim_i2t, _ = itc_loss(images[half], texts[half], 0.07, ids[half])
        assert torch.allclose(sim_i2t, whole_sim[half], atol=1e-6)
        losses = distributed.all_gather_object(loss.item())
        assert sum(losses) / 2 == pytest.approx(whole.item(), rel=1e-5)
        neg = sample_hard_negatives(sim_i2t, sim_i2t, ids[half], generator=gen)
        assert (ids[neg.texts] != ids[half]).all() and neg.has_text.all()
        from vlbridge.train.caption_keys import gathered_caption_keys

        captions = [("x",), ("y", "x"), ("y", "z", "w"), ("w",)]  # rank 0's rows are 2 wide, rank 1's 3: padded to 3
        texts_ = ["x", "y", "y", "w"]
        keys, rows, all_keys, all_rows = gathered_caption_keys(texts_[half], captions[half], torch.device("cpu"))
        assert rows.shape == (2, 3) and all_rows.shape == (4, 3) and all_keys.shape == (4,)
        pos = caption_positives(ids[half], keys, rows, ids, all_keys, all_rows)
        whole_keys, whole_rows, _, _ = gathered_caption_keys(texts_, captions, torch.device("cpu"))  # every rank the whole batch
        whole_pos = caption_positives(ids, whole_keys, whole_rows, ids, whole_keys, whole_rows)
        assert torch.equal(pos.i2t, whole_pos.i2t[half]) and torch.equal(pos.t2i, whole_pos.t2i[half])
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_gathers(tmp_path: Path):
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    # fork (as DataLoader workers do, one thread each): spawning would import torch twice more (seconds)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_gloo_worker, args=(str(tmp_path / "store"),), nprocs=2, join=True, start_method=method)


# -- caption positives --------------------------------------------------------------------------

def test_caption_positives_mark_every_image_that_has_the_text():
    from vlbridge.train.caption_keys import caption_key_rows, text_keys

    texts = ["two shapes", "a red circle", "two shapes", "a blue star"]
    captions = [("two shapes", "a red circle"), ("a red circle", "two shapes"), ("two shapes", "a green cross"), ("a blue star",)]
    ids = torch.tensor([0, 0, 1, 2])  # samples 0 and 1 show the same image
    keys, rows = text_keys(texts, torch.device("cpu")), caption_key_rows(captions, torch.device("cpu"))
    assert rows.shape == (4, 2) and rows[3, 1] == NO_CAPTION and (keys >= 0).all()
    pos = caption_positives(ids, keys, rows, ids, keys, rows)
    # text n is true of image b when n is among b's captions (or b shows n's image)
    assert pos.i2t.tolist() == [[True, True, True, False], [True, True, True, False], [True, False, True, False],
                                [False, False, False, True]]
    assert torch.equal(pos.t2i, pos.i2t.t())  # one batch on one rank: the same relation read the other way
    same = image_positives(ids, ids)
    assert torch.equal(same.i2t, positive_mask(ids, ids)) and (pos.i2t >= same.i2t).all()


def test_itc_and_negatives_follow_the_positives_they_are_given():
    gen = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(3, 2, 8, generator=gen), dim=-1)
    texts = F.normalize(torch.randn(3, 8, generator=gen), dim=-1)
    ids = torch.tensor([0, 1, 2])
    plain, sim_i2t, sim_t2i = itc_loss(images, texts, 0.1, ids, label_smoothing=0.0)
    same, _, _ = itc_loss(images, texts, 0.1, ids, label_smoothing=0.0, positives=image_positives(ids, ids))
    assert same == plain
    # text 2 is also true of image 0: row 0 of i2t and row 2 of t2i share their mass over two columns
    i2t = torch.eye(3, dtype=torch.bool); i2t[0, 2] = True
    wider, _, _ = itc_loss(images, texts, 0.1, ids, label_smoothing=0.0, positives=Positives(i2t, i2t.t().contiguous()))
    log_i2t, log_t2i = F.log_softmax(sim_i2t, 1), F.log_softmax(sim_t2i, 1)
    by_hand = -(log_i2t[0, [0, 2]].mean() + log_i2t[1, 1] + log_i2t[2, 2]) / 3 - (log_t2i[0, 0] + log_t2i[1, 1] + log_t2i[2, [0, 2]].mean()) / 3
    assert wider.item() == pytest.approx(by_hand.item() / 2, rel=1e-5)
    # image 0 has only text 1 left to be its negative; text 2 only image 1
    for seed in range(20):
        neg = sample_hard_negatives(sim_i2t, sim_t2i, ids, generator=torch.Generator().manual_seed(seed),
                                    positives=Positives(i2t, i2t.t().contiguous()))
        assert neg.texts[0] == 1 and neg.images[2] == 1
    with pytest.raises(VLBridgeError, match=r"positives.i2t must be a \(3, 3\) bool mask"):
        itc_loss(images, texts, 0.1, ids, positives=Positives(i2t.float(), i2t))
