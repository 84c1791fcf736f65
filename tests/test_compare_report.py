"""The comparison's config checks and its report (aggregation over seeds, markdown, PNG), on made-up results."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from pydantic import ValidationError

from vlbridge.compare import CompareConfig, RunSpec
from vlbridge.compare.report import aggregate, write_report
from vlbridge.compare.runner import resolve_assembly


def _result(seed: int, vqa: float, r1: float | None) -> dict:
    test = {"vqa": {"overall": vqa, "per_question_type": {"what color is the": vqa + 5, "how many": vqa - 5}},
            "caption": {"CIDEr": vqa / 100, "Bleu_4": 0.1}}
    if r1 is not None:
        test["retrieval"] = {"itm": {"i2t_r1": r1, "t2i_r1": r1 - 1}}
    return {"seed": seed, "train": {"train_seconds": 10.0}, "cost": {"visual_tokens": 32, "llm_forward_ms": 5.0},
            "eval": {"test": test, "comp": {"vqa": {"overall": vqa - 10}}}}


def test_aggregate_means_and_spread():
    table = aggregate({"q": [_result(0, 60.0, 80.0), _result(1, 70.0, 90.0)], "lin": [_result(0, 50.0, None)]})
    assert table["q"]["VQA %"] == {"mean": 65.0, "std": 5.0, "n": 2}
    assert table["q"]["R@1 i2t"]["mean"] == 85.0
    assert table["lin"]["R@1 i2t"]["mean"] is None  # projectors have no retrieval
    assert table["q"]["VQA how many"]["mean"] == 60.0


def test_report_files(tmp_path):
    results = write_report(tmp_path, {"name": "t"}, {"q": [_result(0, 60.0, 80.0), _result(1, 70.0, 90.0)],
                                                     "lin": [_result(0, 50.0, None)]}, ["a note"])
    report = (tmp_path / "report.md").read_text()
    assert "65.0 ± 5.0" in report and "85.0 ± 5.0" in report
    assert "| lin |" in report and "–" in report and "- a note" in report
    assert "VQA how many" in report
    assert json.loads((tmp_path / "results.json").read_text())["summary"]["q"]["VQA %"]["mean"] == 65.0
    assert Image.open(tmp_path / "report.png").size[0] > 200
    assert results["notes"] == ["a note"]


def test_config_checks():
    run = {"name": "a", "assembly": "tiny-qformer-opt", "stage2_steps": 2}
    with pytest.raises(ValidationError, match="unique"):
        CompareConfig(runs=[run, run], stage2_data={}, output_dir="x")
    with pytest.raises(ValidationError, match="stage1_data"):
        CompareConfig(runs=[{**run, "stage1_steps": 2}], stage2_data={}, output_dir="x")
    with pytest.raises(ValidationError, match="extra"):
        CompareConfig(runs=[run], stage2_data={}, output_dir="x", colour="red")


def test_resolve_assembly_overrides_connector_options():
    raw = resolve_assembly(RunSpec(name="q8", assembly="tiny-qformer-opt", connector_options={"num_query_tokens": 4}, stage2_steps=1))
    assert raw["name"] == "q8" and raw["connector"]["options"] == {"variant": "tiny", "num_query_tokens": 4}
