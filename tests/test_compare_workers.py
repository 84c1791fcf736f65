"""Sharing a comparison's runs out to worker processes (`CompareConfig.jobs`): runs that share a
stage 1 stay in one worker, the load is balanced, and finished runs are not handed out again.
(`tests/test_demo.py` runs the quick demo with two workers and checks a run against one process.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlbridge.compare.config import CompareConfig, RunSpec
from vlbridge.compare.workers import share_out, work_groups

DATA = {"format": "coco", "paths": ["captions.json"], "image_root": "."}  # checked as a DataConfig, never read here
EVALS = [{"name": "val", "captions": "captions.json", "images": ".", "tasks": ["caption"]}]  # never read here


def _config(tmp_path: Path, jobs: int = 2) -> CompareConfig:
    q32 = {"num_query_tokens": 32}
    runs = [RunSpec(name="a", assembly="tiny-qformer-opt", connector_options=q32, stage1_steps=10, stage2_steps=10),
            RunSpec(name="a-again", assembly="tiny-qformer-opt", connector_options=q32, stage1_steps=10, stage2_steps=20),
            RunSpec(name="b", assembly="tiny-qformer-opt", connector_options={"num_query_tokens": 8}, stage1_steps=10, stage2_steps=10),
            RunSpec(name="linear", assembly="tiny-linear-opt", stage2_steps=20)]
    return CompareConfig(runs=runs, stage1_data=DATA, stage2_data=DATA, evals=EVALS, output_dir=str(tmp_path), seeds=[0, 1], jobs=jobs)


def test_runs_sharing_a_stage1_stay_together(tmp_path: Path):
    groups = [group for _, group in work_groups(_config(tmp_path))]
    assert sorted(groups) == [(0, ["a", "a-again"]), (0, ["b"]), (0, ["linear"]), (1, ["a", "a-again"]), (1, ["b"]), (1, ["linear"])]


def test_shares_are_balanced_and_never_empty():
    groups = [(30.0, (0, ["big"])), (20.0, (0, ["mid"])), (10.0, (0, ["s1"])), (10.0, (0, ["s2"]))]
    shares = share_out(groups, 2)
    loads = sorted(sum(cost for cost, g in groups if g in share) for share in shares)
    assert loads == [35.0, 35.0] or loads == [30.0, 40.0]
    assert sum(len(s) for s in shares) == 4
    assert len(share_out(groups[:1], 8)) == 1  # more jobs than work: one worker
    assert share_out([], 2) == []


def test_stored_results_are_not_handed_out_again(tmp_path: Path):
    from vlbridge.compare.runner import RESULT_FILE, run_key

    config = _config(tmp_path)
    linear = config.runs[-1]
    stored = tmp_path / "runs" / "linear" / "seed-0" / RESULT_FILE
    stored.parent.mkdir(parents=True)
    stored.write_text(json.dumps({"key": run_key(config, linear, 0), "result": {"seed": 0}}))
    groups = [group for _, group in work_groups(config)]
    assert (0, ["linear"]) not in groups and (1, ["linear"]) in groups


def test_jobs_do_not_change_a_run_key(tmp_path: Path):
    from vlbridge.compare.runner import run_key

    one, two = _config(tmp_path, jobs=1), _config(tmp_path, jobs=2)
    assert run_key(one, one.runs[0], 0) == run_key(two, two.runs[0], 0)


@pytest.mark.parametrize("jobs", [0, 65])
def test_jobs_out_of_range_is_a_config_error(tmp_path: Path, jobs: int):
    with pytest.raises(ValueError, match="jobs"):
        _config(tmp_path, jobs=jobs)
