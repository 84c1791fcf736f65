"""Two gloo processes (the environment torchrun sets up) train like one process on the same global
batch: the same losses and, after DDP's all-reduce, the same gradients, with the real stage-1
objective (ITC gathered across ranks, ITM on gathered negatives, ITG) and the real stage-2 LM loss on
captions of unequal lengths (the token mean is over the global batch, not a mean of rank means).
Gradient accumulation likewise trains as one big batch. Only rank 0 writes."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_trainer_samples import (config, deterministic_stage1, exact_stage1, read_metrics, recording_gradients, subprocess_env,
                                       write_caption_data, write_config)
from vlbridge.train.checkpointing import load_trainer_state

STEPS = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(config_path: Path, grads: Path, world_size: int = 2, *extra: str, module: str = "tests.test_trainer_samples") -> list[subprocess.Popen]:
    """What `torchrun --nproc_per_node 2` does for each worker (running `module`): env:// rendezvous variables."""
    port, workers = str(free_port()), []
    for rank in range(world_size):
        env = dict(subprocess_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
        workers.append(subprocess.Popen([sys.executable, "-m", module, str(config_path), str(grads), *extra],
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return workers


def test_two_processes_match_one_on_the_same_global_batch(tmp_path):
    data = write_caption_data(tmp_path / "data")
    (tmp_path / "grads2").mkdir()
    (tmp_path / "grads1").mkdir()
    common = dict(steps=STEPS, log_every=1, save_every=STEPS, with_eval=True)
    two = write_config(tmp_path / "two.yaml", config(data, tmp_path / "two", batch_size=2, **common))
    workers = launch(two, tmp_path / "grads2")
    try:
        import vlbridge.train

        before = torch.get_num_threads()
        torch.set_num_threads(1)
        with exact_stage1(tmp_path / "grads1"):
            vlbridge.train.run(config(data, tmp_path / "one", batch_size=4, **common), objective=deterministic_stage1)
        torch.set_num_threads(before)
    finally:
        outputs = [worker.communicate(timeout=240) for worker in workers]
    for worker, (_, err) in zip(workers, outputs):
        assert worker.returncode == 0, err

    one, two_ranks = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(two_ranks) == STEPS + 1  # rank 0 alone writes metrics: a line per step, then the evaluation
    for a, b in zip(one[:STEPS], two_ranks):
        for name in ("loss", "itc", "itm", "itg"):
            assert b[name] == pytest.approx(a[name], rel=1e-5), (a["step"], name)
        assert a["lr"] == b["lr"]
    assert two_ranks[-1]["eval_loss"] == pytest.approx(one[-1]["eval_loss"], rel=1e-5)  # each rank evaluates its share

    for step in range(1, STEPS + 1):
        reference = torch.load(tmp_path / "grads1" / f"rank0-step{step}.pt", weights_only=True)
        rank0, rank1 = (torch.load(tmp_path / "grads2" / f"rank{r}-step{step}.pt", weights_only=True) for r in (0, 1))
        assert all(torch.equal(a, b) for a, b in zip(rank0, rank1))  # all-reduced: identical on every rank
        for a, b in zip(reference, rank0):
            # The temperature's gradient (the only scalar) sums every similarity's ~1/temp term and
            # nearly cancels: after an Adam step it differs between 1 and 2 processes by ~1e-6
            # absolute from rounding alone (ratio to this tolerance 0.2-3 with no change in the math).
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 if a.dim() == 0 else 1e-6)

    state = load_trainer_state(tmp_path / "two" / "checkpoints" / f"step-{STEPS}")
    assert state["world_size"] == 2
    assert [r["data"]["samples"] for r in state["ranks"]] == [STEPS * 2, STEPS * 2]  # each rank's own position
    assert not torch.equal(state["ranks"][0]["rng"]["torch"], state["ranks"][1]["rng"]["torch"])  # seeded per rank


def stage2_config(data: Path, output_dir: Path, **overrides) -> dict:
    """Stage 2 of an MLP projector on tiny OPT: no dropout anywhere, solid images (crops and flips
    change nothing), so 1 and 2 processes compute the same numbers."""
    return config(data, output_dir, assembly="tiny-mlp-opt", stage=2, steps=STEPS, log_every=1, save_every=STEPS, **overrides)


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
def test_stage2_two_processes_match_one_on_captions_of_unequal_lengths(tmp_path, soft_prompt_norm):
    """`llm`: the soft prompt's scale is measured over both ranks' halves of the first batch (unequal
    token counts), as one process measures it over the whole batch."""
    data = write_caption_data(tmp_path / "data", uneven=True)
    for name in ("grads1", "grads2"):
        (tmp_path / name).mkdir()
    objective = {"objective": {"soft_prompt_norm": soft_prompt_norm}}
    two = write_config(tmp_path / "two.yaml", stage2_config(data, tmp_path / "two", batch_size=4, with_eval=True, **objective))
    workers = launch(two, tmp_path / "grads2", 2, "stage2")
    try:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        import vlbridge.train

        with recording_gradients(tmp_path / "grads1"):
            vlbridge.train.run(stage2_config(data, tmp_path / "one", batch_size=8, with_eval=True, **objective))
        torch.set_num_threads(before)
    finally:
        outputs = [worker.communicate(timeout=240) for worker in workers]
    for worker, (_, err) in zip(workers, outputs):
        assert worker.returncode == 0, err
    assert_same_run(tmp_path / "one", tmp_path / "two", tmp_path / "grads1", tmp_path / "grads2", names=("loss", "lm", "eval_loss"))


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
