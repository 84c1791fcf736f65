"""AdamW's parameter groups (BLIP-2: no weight decay on biases, norms and other 1-D parameters),
the warm-up + cosine schedule, and RNG states that survive the trainer state's file (and an older weights_only one)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

import vlbridge
from vlbridge.files.state_file import read_state, write_state
from vlbridge.train.checkpointing import capture_rng, restore_rng
from vlbridge.train.config import OptimizerConfig, ScheduleConfig
from vlbridge.train.optim import WarmupCosine, build_optimizer, parameter_groups


@pytest.fixture(scope="module")
def stage1_qformer():
    return vlbridge.build("tiny-qformer-opt", stage=1)


def test_groups_decay_only_matrices_and_skip_frozen(stage1_qformer):
    model = stage1_qformer
    decay, no_decay = parameter_groups(model, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(model.get_parameter(n).ndim >= 2 and not n.endswith(".bias") for n in decayed)
    assert all(model.get_parameter(n).ndim < 2 for n in spared)
    assert "connector.temp" in spared and "connector.query_tokens" in decayed  # scalar spared, (1, Q, W) decayed
    assert any(n.endswith("ln_vision.weight") for n in spared) and any(n.endswith(".bias") for n in spared)
    assert not any(n.startswith(("connector.proj.", "encoder.")) for n in decayed | spared)  # frozen in stage 1
    assert len(decayed) + len(spared) == len(model.trainable_parameters())


def test_optimizer_is_adamw_with_the_configured_settings(stage1_qformer):
    optimizer = build_optimizer(stage1_qformer, OptimizerConfig(lr=2e-4, betas=(0.9, 0.999), weight_decay=0.1, eps=1e-6))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert all(g["betas"] == (0.9, 0.999) and g["eps"] == 1e-6 for g in optimizer.param_groups)


def test_warmup_then_cosine_to_min_lr():
    param = torch.nn.Parameter(torch.zeros(2, 2))
    optimizer = torch.optim.AdamW([{"params": [param]}, {"params": [], "weight_decay": 0.0}], lr=1.0)
    schedule = WarmupCosine(optimizer, lr=1.0, total_steps=20, schedule=ScheduleConfig(warmup_steps=4, warmup_lr=0.2, min_lr=0.1))
    lrs = []
    for _ in range(25):
        lrs.append(optimizer.param_groups[0]["lr"])
        assert optimizer.param_groups[1]["lr"] == lrs[-1]  # one lr for every group
        schedule.step()
    assert lrs[:4] == pytest.approx([0.4, 0.6, 0.8, 1.0])  # linear from warmup_lr to the peak
    assert lrs[4] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(lrs[4:19], lrs[5:20]))  # strictly decreasing cosine
    assert lrs[12] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down at the middle of the decay
    assert lrs[19] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 15 / 16)))
    assert lrs[20:] == pytest.approx([0.1] * 5)  # held at min_lr past the end


def test_schedule_state_restores_the_position():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    settings = ScheduleConfig(warmup_steps=2, min_lr=0.0)
    first = WarmupCosine(optimizer, lr=1.0, total_steps=10, schedule=settings)
    for _ in range(6):
        first.step()
    second = WarmupCosine(optimizer, lr=1.0, total_steps=10, schedule=settings)
    second.load_state_dict(first.state_dict())
    assert second.lr == first.lr == optimizer.param_groups[0]["lr"] == pytest.approx(first.lr_at(6))


@pytest.mark.parametrize("kind", ["safetensors", "pt"])
def test_rng_states_round_trip_through_a_state_file_and_weights_only(tmp_path, kind):
    """Through the trainer state's safetensors file, and an older run's .pt read with weights_only."""
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    path = tmp_path / f"rng.{kind}"
    if kind == "pt":
        torch.save(capture_rng(), path)
    else:
        write_state(path, capture_rng(), header={})
    first = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng(torch.load(path, weights_only=True) if kind == "pt" else read_state(path))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_lr_scales_give_a_name_prefix_its_own_peak(stage1_qformer):
    """Issue 20: stage 2 may train the Q-Former body slower than the rest (keep stage 1's features)."""
    config = OptimizerConfig(lr=1e-3, lr_scales={"connector.layers": 0.1, "connector.layers.0": 0.5})
    optimizer = build_optimizer(stage1_qformer, config)
    schedule = WarmupCosine(optimizer, lr=1e-3, total_steps=10, schedule=ScheduleConfig())
    names = {id(p): n for n, p in stage1_qformer.named_parameters()}
    lr_of = {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    body = [n for n in lr_of if n.startswith("connector.layers.") and not n.startswith("connector.layers.0.")]
    assert body and all(lr_of[n] == pytest.approx(1e-4) for n in body)
    assert all(lr_of[n] == pytest.approx(5e-4) for n in lr_of if n.startswith("connector.layers.0."))  # longest prefix
    assert lr_of["connector.query_tokens"] == pytest.approx(1e-3)  # outside every prefix: the peak
    assert len(lr_of) == len(stage1_qformer.trainable_parameters())
    schedule.step()
    assert schedule.lr > 0


def test_lr_scales_name_what_is_wrong(stage1_qformer):
    with pytest.raises(vlbridge.VLBridgeError, match=r"optimizer.lr_scales: 'connector.nothing' .*trainable"):
        build_optimizer(stage1_qformer, OptimizerConfig(lr_scales={"connector.nothing": 0.1}))
    with pytest.raises(ValueError, match="above 0"):
        OptimizerConfig(lr_scales={"connector.layers": 0.0})
