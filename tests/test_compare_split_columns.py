"""A comparison's table shows every evaluation split it scored, whatever the split is named: a
config's own split ("val", or a second test set) used to reach results.json but no column of the
report, its plot or its significance tests, which showed only the demo's "test" and "comp"."""

from __future__ import annotations

import json

from tests.test_compare_report import _result
from vlbridge.compare.report import write_report


def _renamed(result: dict, names: dict[str, str]) -> dict:
    return {**result, "eval": {names.get(split, split): tasks for split, tasks in result["eval"].items()}}


def test_a_split_named_val_gets_its_columns(tmp_path):
    rows = {"q": [_renamed(_result(0, 3, True), {"test": "val"})], "lin": [_renamed(_result(0, 2, False), {"test": "val"})]}
    results = write_report(tmp_path, {"name": "t"}, rows, [])
    report = (tmp_path / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| run |"))
    for label in ("VQA % (val)", "CIDEr (val)", "R@1 i2t (val)", "R@1 t2i ITC (val)"):
        assert label in header, header
    assert results["summary"]["lin"]["VQA % (val)"]["mean"] == 50.0  # right on every second question
    assert "### VQA accuracy (%) per question type, val split" in report
    assert any(d["metric"] == "VQA % (val)" for d in results["significance"]["pairs"]["results"])
    assert json.loads((tmp_path / "results.json").read_text())["summary"]["q"]["CIDEr (val)"]["mean"] == 0.5


def test_captions_of_the_comp_split_are_shown_too(tmp_path):
    comp_captions = {"CIDEr": 0.25, "items": {"image_id": [0, 1], "CIDEr": [0.25, 0.25], "caption": ["c", "c"]}}
    row = _result(0, 3, False)
    row["eval"]["comp"]["caption"] = comp_captions
    results = write_report(tmp_path, {"name": "t"}, {"q": [row]}, [])
    assert results["summary"]["q"]["CIDEr (comp)"]["mean"] == 0.25
    assert results["summary"]["q"]["VQA comp %"]["mean"] is not None and "VQA % (comp)" not in results["summary"]["q"]
