"""Two gloo processes (the environment torchrun sets up) train like one process on the same global
batch: the same losses and, after DDP's all-reduce, the same gradients, with the real stage-1
objective (ITC gathered across ranks, ITM on gathered negatives, ITG) and the real stage-2 LM loss on
captions of unequal lengths (the token mean is over the global batch, not a mean of rank means).
Gradient accumulation likewise trains as one big batch. Only rank 0 writes."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.test_trainer_samples import (config, read_metrics, recording_gradients, subprocess_env, train_recording, write_caption_data,
                                       write_config)
from vlbridge.train.checkpointing import load_trainer_state

STEPS = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(module: str, *args: str | Path, world_size: int = 2) -> list[subprocess.Popen]:
    """`python -m module *args` once per rank, with the env:// rendezvous variables torchrun sets
    (without torchrun's agent: one process, and one torch import, fewer per launch)."""
    port, workers = str(free_port()), []
    for rank in range(world_size):
        env = dict(subprocess_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
        workers.append(subprocess.Popen([sys.executable, "-m", module, *map(str, args)],
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return workers


def finish(workers: list[subprocess.Popen], timeout: float = 300) -> list[tuple[str, str]]:
    """Each rank's (stdout, stderr), every rank having exited 0. When one fails (or time runs out) the
    others are killed, as torchrun's agent does: none is left waiting in a collective."""
    deadline, outputs = time.monotonic() + timeout, {}
    try:
        while len(outputs) < len(workers):
            for rank, worker in enumerate(workers):
                if rank in outputs:
                    continue
                with contextlib.suppress(subprocess.TimeoutExpired):
                    outputs[rank] = worker.communicate(timeout=0.05)  # a timeout keeps the output read so far
                    assert worker.returncode == 0, f"rank {rank} failed:\n{outputs[rank][1]}"
            assert time.monotonic() < deadline, f"ranks still running after {timeout} s: {sorted(set(range(len(workers))) - set(outputs))}"
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
    return [outputs[rank] for rank in range(len(workers))]


def train_both(module: str, root: Path, two: Mapping[str, Any], here: Mapping[str, Any]) -> None:
    """Train the `two` configs on two ranks of one launch of `module` (each launch costs seconds of
    start-up) while this process trains the `here` ones: each run's gradients go to root/grads-NAME."""
    for name in [*two, *here]:
        (root / f"grads-{name}").mkdir()
    workers = launch(module, *(arg for name, values in two.items() for arg in (write_config(root / f"{name}.yaml", values), root / f"grads-{name}")))
    try:
        for name, values in here.items():
            train_recording(values, root / f"grads-{name}")
    finally:
        finish(workers)


def stage2_config(data: Path, output_dir: Path, **overrides) -> dict:
    """Stage 2 of an MLP projector on tiny OPT: no dropout anywhere, solid images (crops and flips
    change nothing), so 1 and 2 processes compute the same numbers."""
    return config(data, output_dir, assembly="tiny-mlp-opt", stage=2, steps=STEPS, log_every=1, save_every=STEPS, **overrides)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_torch_thread) -> Path:
    """The runs the tests below compare, each in root/NAME with its gradients in root/grads-NAME: the
    two-process ones (`-2`, half the global batch per rank) in one launch, since each launch costs
    seconds of start-up, while this process trains the one-process references (`-1`)."""
    root = tmp_path_factory.mktemp("ddp")
    even, uneven = write_caption_data(root / "even"), write_caption_data(root / "uneven", uneven=True)
    values = {f"stage1-{n}": config(even, root / f"stage1-{n}", batch_size=4 // n, steps=STEPS, log_every=1, save_every=STEPS,
                                    with_eval=True) for n in (2, 1)}
    for norm in ("init", "llm"):  # soft_prompt_norm
        values.update({f"{norm}-{n}": stage2_config(uneven, root / f"{norm}-{n}", batch_size=8 // n, with_eval=True,
                                                    objective={"soft_prompt_norm": norm}) for n in (2, 1)})
    train_both("tests.test_trainer_samples", root, {name: run for name, run in values.items() if name.endswith("-2")},
               {name: run for name, run in values.items() if name.endswith("-1")})
    return root


def test_two_processes_match_one_on_the_same_global_batch(runs):
    one, two_ranks = read_metrics(runs / "stage1-1"), read_metrics(runs / "stage1-2")
    assert len(two_ranks) == STEPS + 1  # rank 0 alone writes metrics: a line per step, then the evaluation
    for a, b in zip(one[:STEPS], two_ranks):
        for name in ("loss", "itc", "itm", "itg"):
            assert b[name] == pytest.approx(a[name], rel=1e-5), (a["step"], name)
        assert a["lr"] == b["lr"]
    assert two_ranks[-1]["eval_loss"] == pytest.approx(one[-1]["eval_loss"], rel=1e-5)  # each rank evaluates its share

    for step in range(1, STEPS + 1):
        reference = torch.load(runs / "grads-stage1-1" / f"rank0-step{step}.pt", weights_only=True)
        rank0, rank1 = (torch.load(runs / "grads-stage1-2" / f"rank{r}-step{step}.pt", weights_only=True) for r in (0, 1))
        assert all(torch.equal(a, b) for a, b in zip(rank0, rank1))  # all-reduced: identical on every rank
        for a, b in zip(reference, rank0):
            # The temperature's gradient (the only scalar) sums every similarity's ~1/temp term and
            # nearly cancels: after an Adam step it differs between 1 and 2 processes by ~1e-6
            # absolute from rounding alone (ratio to this tolerance 0.2-3 with no change in the math).
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 if a.dim() == 0 else 1e-6)

    state = load_trainer_state(runs / "stage1-2" / "checkpoints" / f"step-{STEPS}")
    assert state["world_size"] == 2
    assert [r["data"]["samples"] for r in state["ranks"]] == [STEPS * 2, STEPS * 2]  # each rank's own position
    assert not torch.equal(state["ranks"][0]["rng"]["torch"], state["ranks"][1]["rng"]["torch"])  # seeded per rank


def assert_same_run(one: Path, other: Path, grads_one: Path, grads_other: Path, names=("loss", "lm")) -> None:
    """Equal logged losses and equal applied gradients at every step."""
    a_metrics, b_metrics = read_metrics(one), read_metrics(other)
    assert len(a_metrics) == len(b_metrics) >= STEPS
    for a, b in zip(a_metrics, b_metrics):
        for name in names:
            if name in a:
                assert b[name] == pytest.approx(a[name], rel=1e-6, abs=1e-7), (a["step"], name, a[name], b[name])
    for step in range(1, STEPS + 1):
        reference = torch.load(grads_one / f"rank0-step{step}.pt", weights_only=True)
        for a, b in zip(reference, torch.load(grads_other / f"rank0-step{step}.pt", weights_only=True)):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("soft_prompt_norm", ["init", "llm"])
def test_stage2_two_processes_match_one_on_captions_of_unequal_lengths(runs, soft_prompt_norm):
    """`llm`: the soft prompt's scale is measured over both ranks' halves of the first batch (unequal
    token counts), as one process measures it over the whole batch."""
    one, two = f"{soft_prompt_norm}-1", f"{soft_prompt_norm}-2"
    assert_same_run(runs / one, runs / two, runs / f"grads-{one}", runs / f"grads-{two}", names=("loss", "lm", "eval_loss"))


@pytest.mark.parametrize("loss_average", ["tokens", "samples"])
def test_stage2_gradient_accumulation_matches_one_big_batch(tmp_path, loss_average, one_torch_thread):
    import vlbridge.train

    data = write_caption_data(tmp_path / "data", uneven=True)
    runs = {"big": dict(batch_size=8, grad_accum=1), "accum": dict(batch_size=2, grad_accum=4)}
    for name, sizes in runs.items():
        (tmp_path / f"grads-{name}").mkdir()
        with recording_gradients(tmp_path / f"grads-{name}"):
            vlbridge.train.run(stage2_config(data, tmp_path / name, objective={"loss_average": loss_average}, **sizes))
    assert_same_run(tmp_path / "big", tmp_path / "accum", tmp_path / "grads-big", tmp_path / "grads-accum")
