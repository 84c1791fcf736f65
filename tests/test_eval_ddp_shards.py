"""Stage-1 evaluation on tar shards under DDP: ranks get unequal shares of the shards, so unequal
numbers of eval batches. The objective gathers every rank's batch; the rank with fewer batches went
on to the loss sum while the other still gathered (gloo: 'collective mismatch', abort; nccl: a hang)."""

from __future__ import annotations

from pathlib import Path

from tests.test_data_samples import sample_members, write_tar
from tests.test_trainer_ddp import finish, launch
from tests.test_trainer_samples import read_metrics, write_config


def test_stage1_eval_on_unequal_shard_shares_runs_on_two_ranks(tmp_path: Path):
    for s, n in enumerate([4, 4]):
        write_tar(tmp_path / "train" / f"{s}.tar", [m for i in range(n) for m in sample_members(f"{s}{i:03d}", s * 10 + i, f"train {s} {i}")])
    for s, n in enumerate([6, 1, 1]):  # rank shares: 6 + 1 and 1 samples (or 2 and 6): 4 batches of 2 against 1
        write_tar(tmp_path / "eval" / f"{s}.tar", [m for i in range(n) for m in sample_members(f"{s}{i:03d}", 50 + s * 10 + i, f"eval {s} {i}")])
    shards = lambda name: {"format": "webdataset", "paths": str(tmp_path / name / "*.tar"), "num_workers": 0}  # noqa: E731
    config = write_config(tmp_path / "c.yaml", {
        "assembly": "tiny-qformer-opt", "stage": 1, "data": {"train": shards("train"), "eval": {**shards("eval"), "shuffle": False}},
        "batch_size": 2, "steps": 1, "optimizer": {"lr": 1e-3}, "schedule": {"warmup_steps": 0}, "log_every": 1,
        "output_dir": str(tmp_path / "run"), "tensorboard": False,
    })
    finish(launch("vlbridge", "train", config), timeout=120)
    assert "eval_loss" in read_metrics(tmp_path / "run")[-1]
