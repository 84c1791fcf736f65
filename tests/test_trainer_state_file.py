"""The trainer state is a safetensors file with a JSON skeleton (vlbridge.files.state_file), so a
resume unpickles nothing: what it reads back is what the trainer saved, to the type (tuples for
random.setstate, int keys for the optimizer) and to the bit, and a resume from it, or from the
trainer_state.pt of a run an older vlbridge wrote, ends as the uninterrupted run."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import vlbridge.train
from tests.test_trainer_samples import as_old_trainer_state, config, train_losses, write_caption_data
from vlbridge.errors import WeightsError
from vlbridge.files.state_file import SKELETON, read_header, read_state, write_state
from vlbridge.train import checkpointing
from vlbridge.train.config import ScheduleConfig
from vlbridge.train.optim import WarmupCosine

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_identical(got: object, want: object, where: str = "state") -> None:
    """Equal in value and in type all the way down: tensors in dtype, shape and every bit; dict keys
    in type and order; floats by repr (nan, -0.0)."""
    assert type(got) is type(want), f"{where}: {type(got).__name__}, saved as {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        assert (got.dtype, got.shape) == (want.dtype, want.shape) and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert [(type(k), k) for k in got] == [(type(k), k) for k in want], where
        for key in want:
            assert_identical(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            assert_identical(a, b, f"{where}/{i}")
    elif isinstance(want, float):
        assert repr(got) == repr(want), where
    else:
        assert got == want, where


# -- the file itself ---------------------------------------------------------------------------
def train_a_little(steps: int) -> tuple[nn.Module, torch.optim.Optimizer, WarmupCosine]:
    """A bf16 layer beside an fp32 one under AdamW with two groups (one keyed by name), `steps` steps in."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2).to(torch.bfloat16))
    optimizer = torch.optim.AdamW([{"params": list(model[0].parameters()), "name": "decay"},
                                   {"params": list(model[1].parameters()), "weight_decay": 0.0, "lr_scale": 0.5}], lr=1e-2)
    schedule = WarmupCosine(optimizer, lr=1e-2, total_steps=10, schedule=ScheduleConfig(warmup_steps=2))
    for _ in range(steps):
        step(model, optimizer, schedule)
    return model, optimizer, schedule


def step(model: nn.Module, optimizer: torch.optim.Optimizer, schedule: WarmupCosine) -> None:
    hidden = model[0](torch.randn(5, 4))
    model[1](hidden.to(torch.bfloat16)).float().pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    schedule.step()


def test_a_trained_optimizer_schedule_scaler_and_rng_state_come_back_identical_and_resume_exactly(tmp_path):
    model, optimizer, schedule = train_a_little(3)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    state = {"format": checkpointing.STATE_FORMAT, "version": checkpointing.STATE_VERSION, "step": 3,
             "optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(), "scaler": scaler.state_dict(),
             "nonfinite": [0, 0], "ranks": [{"rng": checkpointing.capture_rng(), "data": {"epoch": 0, "streams": {"a": 4}}}]}
    assert state["scaler"] and isinstance(state["optimizer"]["param_groups"][0]["betas"], tuple)
    write_state(tmp_path / "state.safetensors", state, header={"format": "test"})
    back = read_state(tmp_path / "state.safetensors")
    assert_identical(back, state)
    assert read_header(tmp_path / "state.safetensors") == {"format": "test"}
    with safe_open(str(tmp_path / "state.safetensors"), framework="pt") as file:  # named by where they sit
        assert {"optimizer/state/0/exp_avg", "optimizer/state/3/exp_avg_sq", "ranks/0/rng/torch"} <= set(file.keys())

    draws = torch.rand(3), np.random.rand(3).tolist(), random.random()
    checkpointing.restore_rng(back["ranks"][0]["rng"])
    assert_identical((torch.rand(3), np.random.rand(3).tolist(), random.random()), draws)

    resumed, fresh, again = train_a_little(0)  # what a resume builds: a fresh model, optimizer and schedule
    resumed.load_state_dict(model.state_dict())  # given the saved weights (connector.safetensors)
    fresh.load_state_dict(back["optimizer"])
    again.load_state_dict(back["scheduler"])
    for _ in range(3):
        generator = torch.get_rng_state()
        step(model, optimizer, schedule)
        torch.set_rng_state(generator)
        step(resumed, fresh, again)
    assert_identical(resumed.state_dict(), model.state_dict())


def test_awkward_tensors_and_values_come_back_identical(tmp_path):
    flat = torch.arange(12, dtype=torch.float32)
    shared = torch.randn(3)
    state = {
        "scalar": torch.tensor(2.5), "step": torch.tensor(7, dtype=torch.int64), "empty": torch.empty(0, 3),
        "empty_bf16": torch.empty(0, dtype=torch.bfloat16), "bf16": torch.randn(2, 3).bfloat16(), "fp16": torch.randn(4).half(),
        "bytes": torch.get_rng_state(), "mask": torch.tensor([True, False]),
        "transposed": torch.randn(3, 4).t(), "strided": flat[::3], "views": [flat[:6], flat[6:].view(2, 3)], "twice": (shared, shared),
        "param": nn.Parameter(torch.ones(2)),
        0: "int key", "0": "str key", "a/b": torch.ones(1), "a": {"b": torch.zeros(1)},  # keys whose paths collide
        "values": (None, True, 0, -1, 2**70, 0.1, -0.0, float("inf"), float("nan"), "", [], (), {}),
    }
    write_state(tmp_path / "s.safetensors", state, header={})
    back = read_state(tmp_path / "s.safetensors")
    want = {**state, "param": state["param"].detach()}  # a parameter comes back as its tensor
    assert_identical(back, want)
    assert torch.equal(shared, back["twice"][0]) and state["transposed"].stride() == (1, 4)  # what was given is left as it was


@pytest.mark.parametrize("state, says", [
    ({"ranks": [{"keys": np.zeros(3)}]}, "cannot write ranks/0/keys: a ndarray"),
    ({"state": {1.5: 0}}, "cannot write state: key 1.5 is a float"),
    ({True: 0}, "cannot write the state: key True is a bool"),
])
def test_what_a_state_file_cannot_keep_is_named_where_it_sits(tmp_path, state, says):
    with pytest.raises(TypeError, match=says):
        write_state(tmp_path / "s.safetensors", state, header={})


def test_a_damaged_or_foreign_state_file_is_named(tmp_path):
    path = tmp_path / "s.safetensors"
    write_state(path, {"w": torch.ones(3)}, header={})
    whole = path.read_bytes()
    for keep in (0, 50, len(whole) - 4):
        path.write_bytes(whole[:keep])
        with pytest.raises(WeightsError, match=rf"cannot read {path} \(.*\): it is truncated or damaged"):
            read_state(path)
    save_file({"w": torch.ones(3)}, str(path))
    with pytest.raises(WeightsError, match=f"holds no '{SKELETON}' metadata"):
        read_state(path)
    save_file({"w": torch.ones(3)}, str(path), metadata={SKELETON: '{"set": [1, 2]}'})
    with pytest.raises(WeightsError, match=r'holds \{"set": \[1, 2\]\}, which is no node this vlbridge reads \(a newer vlbridge'):
        read_state(path)
    save_file({"w": torch.ones(3)}, str(path), metadata={SKELETON: '{"tensor": "v"}'})
    with pytest.raises(WeightsError, match="names tensor 'v', which the file lacks"):
        read_state(path)


# -- a run resumed from it --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict]:
    """A stage-1 run (dropout: the RNG states matter) of 4 steps, saved at steps 2 and 4."""
    root = tmp_path_factory.mktemp("state")
    values = config(write_caption_data(root / "data", images=8), root / "whole", steps=4, save_every=2, log_every=1)
    vlbridge.train.run(values, quiet=True)
    return root / "whole", values


@pytest.mark.parametrize("written_by", ["this vlbridge", "an older vlbridge"])
def test_a_resume_from_step_2_ends_as_the_uninterrupted_run(tmp_path, run, written_by):
    whole, values = run
    parts = tmp_path / "parts"
    shutil.copytree(whole, parts)
    checkpoints = parts / checkpointing.CHECKPOINTS
    shutil.rmtree(checkpoints / "step-4")
    (checkpoints / checkpointing.LATEST).write_text("step-2\n")
    if written_by == "an older vlbridge":
        as_old_trainer_state(checkpoints / "step-2")
    result = vlbridge.train.run({**values, "output_dir": str(parts)}, resume=True, quiet=True)
    assert result.step == 4
    expected, got = (load_file(run_dir / checkpointing.CHECKPOINTS / "step-4" / "connector.safetensors") for run_dir in (whole, parts))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert train_losses(parts) == train_losses(whole)
    assert sorted(p.name for p in (checkpoints / "step-4").glob("trainer_state.*")) == [checkpointing.TRAINER_STATE]
