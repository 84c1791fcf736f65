"""lmms-eval tasks inside `vlbridge compare`: a trained run and a checkpoint run are both scored on a
local lmms-eval task, the report's table and plot get its column (with intervals from the per-document
scores), and a rerun reuses the stored results. Skipped where the lmms-eval extra is not installed."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("lmms_eval", reason='needs the lmms-eval extra: pip install -e ".[test,lmms-eval]"')

import vlbridge  # noqa: E402
from tests.lmms_tasks import MC_TASK, VQA_TASK, write_tasks  # noqa: E402
from vlbridge.compare.config import CompareConfig, EvalSet, RunSpec  # noqa: E402
from vlbridge.compare.run import run_compare  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_trained_run_and_a_checkpoint_are_scored_on_an_lmms_eval_task(tmp_path, monkeypatch):
    from vlbridge.world import WorldConfig, generate_world

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    world = tmp_path / "world"
    generate_world(world, WorldConfig(train=4, val=0, test=0, comp=0, questions_per_image=1))
    tasks = write_tasks(tmp_path / "tasks")
    vlbridge.build("tiny-mlp-opt").save(tmp_path / "ckpt")
    data = {"format": "coco", "paths": [str(world / "captions_train.json")], "image_root": str(world)}
    lmms = {"tasks": [VQA_TASK, MC_TASK], "include_path": str(tasks), "include_defaults": False, "prompt": "Question: {} Short answer:"}
    config = CompareConfig(name="lmms", runs=[RunSpec(name="trained", assembly="tiny-linear-opt", stage2_steps=2),
                                              RunSpec(name="checkpoint", checkpoint=str(tmp_path / "ckpt"))],
                           stage2_data=data, evals=[EvalSet(name="bench", lmms_eval=lmms)], batch_size=2,
                           output_dir=str(tmp_path / "out"), features=False)
    said: list[str] = []
    run_compare(config, say=said.append)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    for run in ("trained", "checkpoint"):
        scored = results["runs"][run][0]["eval"]["bench"]
        assert scored[f"lmms:{MC_TASK}"]["items"]["doc_id"] == list(range(6))
        assert scored[f"lmms:{VQA_TASK}"]["aggregate"]["exact_match"] == pytest.approx(
            sum(scored[f"lmms:{VQA_TASK}"]["items"]["exact_match"]) / 6)
        cell = results["summary"][run][f"{MC_TASK} acc"]
        assert cell["low"] <= cell["mean"] <= cell["high"]  # an interval from the per-document scores
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"| run | visual tokens | {VQA_TASK} exact_match | {MC_TASK} acc |" in report
    assert (tmp_path / "out" / "report.png").stat().st_size > 0

    said.clear()
    run_compare(config, say=said.append)
    assert sum("reusing its results" in line for line in said) == 2
    assert not any("lmms-eval" in line for line in said)


def test_a_changed_local_task_rescores_the_runs(tmp_path):
    from vlbridge.compare.runner import run_key

    tasks = write_tasks(tmp_path / "tasks", count=2)
    lmms = {"tasks": [VQA_TASK], "include_path": str(tasks), "include_defaults": False}
    config = CompareConfig(runs=[RunSpec(name="c", checkpoint=str(tmp_path))], evals=[EvalSet(name="b", lmms_eval=lmms)],
                           output_dir=str(tmp_path / "out"))
    before = run_key(config, config.runs[0], 0)
    (tasks / "vqa.jsonl").write_text((tasks / "vqa.jsonl").read_text() * 2)
    assert run_key(config, config.runs[0], 0) != before


def test_a_missing_extra_is_said_before_anything_trains(tmp_path, monkeypatch):
    import importlib.util

    from vlbridge.errors import VLBridgeError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lmms_eval" else real(name, *a))
    lmms = {"tasks": [VQA_TASK], "include_path": str(tmp_path)}
    config = CompareConfig(runs=[RunSpec(name="c", checkpoint=str(tmp_path))], evals=[EvalSet(name="b", lmms_eval=lmms)],
                           output_dir=str(tmp_path / "out"))
    with pytest.raises(VLBridgeError, match=r'pip install "vlbridge\[lmms-eval\]"'):
        run_compare(config, say=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_a_tag_is_refused_before_scoring_naming_its_tasks(tmp_path):
    """lmms-eval runs a tag's tasks but gives the tag no result: the scores were lost to a KeyError at the end."""
    from vlbridge.errors import VLBridgeError
    from vlbridge.lmms.options import LmmsEvalSpec
    from vlbridge.lmms.tasks import score_tasks

    tasks = write_tasks(tmp_path / "tasks", count=2)
    (tasks / f"{VQA_TASK}.yaml").write_text((tasks / f"{VQA_TASK}.yaml").read_text() + "tag: local_bench\n")
    spec = LmmsEvalSpec(tasks=["local_bench"], include_path=str(tasks), include_defaults=False)
    with pytest.raises(VLBridgeError, match=rf"tags \['local_bench'\].*list their tasks instead \(local_bench: \['{VQA_TASK}'\]\)"):
        score_tasks(object(), spec, say=lambda _: None)
