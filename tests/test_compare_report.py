"""The comparison's config checks and its report (tables with intervals per group, significance,
the matplotlib figure), on made-up results with per-item scores."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from pydantic import ValidationError

from vlbridge.compare import CompareConfig, RunSpec
from vlbridge.compare.report import write_report
from vlbridge.compare.runner import resolve_assembly, stage1_key, stage1_trainers
from vlbridge.compare.table import HEADLINE, cell, summarise

IMAGES = 60


def _vqa(right_every: int, offset: int = 0) -> dict:
    """Two questions per image; a question is right when its index is not a multiple of `right_every`."""
    ids = list(range(2 * IMAGES))
    accuracy = [0.0 if (q + offset) % right_every == 0 else 1.0 for q in ids]
    items = {"question_id": ids, "image_id": [q // 2 for q in ids], "question_type": ["how many", "what color is the"] * IMAGES,
             "category": ["count", "colour"] * IMAGES, "answer": ["x"] * len(ids), "accuracy": accuracy}
    return {"overall": 100 * sum(accuracy) / len(ids), "items": items}


def _result(seed: int, right_every: int, retrieval: bool) -> dict:
    test = {"vqa": _vqa(right_every, seed),
            "caption": {"CIDEr": 0.5, "items": {"image_id": list(range(IMAGES)), "CIDEr": [0.5] * IMAGES, "caption": ["c"] * IMAGES}}}
    if retrieval:
        hits = [1] * (IMAGES // 2) + [0] * (IMAGES // 2)
        test["retrieval"] = {"items": {"i2t": {"image_id": list(range(IMAGES)), "itm_hit1": hits, "itc_hit1": hits},
                                       "t2i": {"text_key": [f"{i}:0" for i in range(IMAGES)], "image_id": list(range(IMAGES)),
                                               "itm_hit1": hits, "itc_hit1": hits}}}
    return {"seed": seed, "train": {"train_seconds": 10.0}, "cost": {"visual_tokens": 32, "llm_forward_ms": 5.0},
            "eval": {"test": test, "comp": {"vqa": _vqa(right_every)}}}


def _rows() -> dict:
    return {"q": [_result(0, 3, True), _result(1, 3, True)], "q-sup": [_result(0, 10, True)], "lin": [_result(0, 2, False)]}


def test_cells_have_intervals_and_seed_means():
    rows = _rows()
    vqa = cell(rows["q"], HEADLINE[0])
    assert vqa["mean"] == pytest.approx(200 / 3) and vqa["low"] < 200 / 3 < vqa["high"] and vqa["n_items"] == 2 * IMAGES
    assert vqa["n_seeds"] == 2
    cider = cell(rows["q"], HEADLINE[2])
    assert (cider["mean"], cider["low"], cider["high"]) == (0.5, 0.5, 0.5)  # a constant: no spread
    table = summarise(rows, HEADLINE)
    assert table["lin"]["R@1 i2t"]["mean"] is None  # projectors have no retrieval
    assert table["q"]["R@1 t2i"]["mean"] == pytest.approx(50.0)
    legacy = cell([{"eval": {"test": {"vqa": {"overall": 61.0}}}}], HEADLINE[0])  # results stored before items were kept
    assert legacy["mean"] == 61.0 and legacy["low"] is None


def test_report_files(tmp_path):
    prior = {"seed": None, "eval": {"test": {"vqa": _vqa(1)}, "comp": {"vqa": _vqa(1)}}}  # always wrong
    results = write_report(tmp_path, {"name": "t"}, _rows(), ["a note"], groups={"q": "zero-shot", "lin": "zero-shot", "q-sup": "supervised"},
                           references={"prior": prior}, key_pairs=[("q", "lin"), ("q", "prior")], titles={"supervised": "Supervised mix"})
    report = (tmp_path / "report.md").read_text()
    assert "## zero-shot" in report and "## Supervised mix" in report
    assert report.index("| q |") < report.index("| q-sup |")
    assert "66.7 [" in report and "| prior |" in report and "- a note" in report
    assert "per question type" in report and "VQA how many" in report
    assert "### Key comparisons" in report and "| q − lin | VQA % | +16.7 [" in report
    assert "**significant**" in report and "not significant" in report  # q vs lin on CIDEr: identical
    assert "Marks compare a row with **q**" in report
    lin = next(line for line in report.splitlines() if line.startswith("| lin |"))
    assert "] ▼ |" in lin and "0.500 [0.500, 0.500] ≈" in lin  # lower VQA than q; the same CIDEr
    saved_marks = json.loads((tmp_path / "results.json").read_text())["significance"]["vs_first_row"]["zero-shot"]
    assert set(saved_marks) == {"lin", "prior"} and saved_marks["lin"]["VQA %"]["diff"] < 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["groups"] == {"zero-shot": ["q", "lin", "prior"], "supervised": ["q-sup", "prior"]}
    key = {(d["a"], d["b"], d["metric"]): d for d in saved["significance"]["key"]}
    assert key[("q", "lin", "VQA %")]["significant"] and not key[("q", "lin", "CIDEr")]["significant"]
    assert key[("q", "prior", "VQA %")]["diff"] == pytest.approx(200 / 3)
    assert any(d["a"] == "q" and d["b"] == "lin" for d in saved["significance"]["pairs"]["zero-shot"])
    assert results["notes"][0] == "a note"
    with Image.open(tmp_path / "report.png") as image:
        assert image.format == "PNG" and image.width > 800 and image.height > 300
        assert image.info.get("Software", "").startswith("Matplotlib")


DATA = {"format": "jsonl", "paths": ["train.jsonl"]}  # checked as a DataConfig, not read
EVALS = [{"name": "val", "captions": "captions.json", "images": ".", "tasks": ["caption"]}]  # not read


def test_config_checks():
    run = {"name": "a", "assembly": "tiny-qformer-opt", "stage2_steps": 2}
    with pytest.raises(ValidationError, match="unique"):
        CompareConfig(runs=[run, run], stage2_data=DATA, evals=EVALS, output_dir="x")
    with pytest.raises(ValidationError, match="stage1_data"):
        CompareConfig(runs=[{**run, "stage1_steps": 2}], stage2_data=DATA, evals=EVALS, output_dir="x")
    with pytest.raises(ValidationError, match="extra"):
        CompareConfig(runs=[run], stage2_data=DATA, evals=EVALS, output_dir="x", colour="red")
    for escaping in ("../../escaped", "a/b", ".hidden", "a\\b", "x" * 101):  # a run's name is its folder under output_dir/runs
        with pytest.raises(ValidationError, match="names the run's folder under output_dir/runs"):
            CompareConfig(runs=[{**run, "name": escaping}], stage2_data=DATA, evals=EVALS, output_dir="x")


def test_runs_with_the_same_stage1_share_it():
    data = {"format": "coco", "paths": ["c.json"]}
    runs = [{"name": "zs", "assembly": "tiny-qformer-opt", "stage1_steps": 3, "stage2_steps": 2},
            {"name": "sup", "assembly": "tiny-qformer-opt", "stage1_steps": 3, "stage2_steps": 2, "group": "supervised",
             "stage2_data": {"format": "jsonl", "paths": ["mix.jsonl"]}},
            {"name": "q4", "assembly": "tiny-qformer-opt", "stage1_steps": 3, "stage2_steps": 2, "connector_options": {"num_query_tokens": 4}}]
    config = CompareConfig(runs=runs, stage1_data=data, stage2_data=data, evals=EVALS, output_dir="x", seeds=[0, 1])
    zs, sup, q4 = config.runs
    assert stage1_key(config, zs, 0) == stage1_key(config, sup, 0) != stage1_key(config, q4, 0)
    assert stage1_key(config, zs, 0) != stage1_key(config, zs, 1)
    assert stage1_trainers(config) == {("zs", 0), ("q4", 0), ("zs", 1), ("q4", 1)}
    assert config.stage2_data_of(sup)["format"] == "jsonl" and config.stage2_data_of(zs) == data
    assert config.groups() == ["results", "supervised"]


def test_resolve_assembly_overrides_connector_options():
    raw = resolve_assembly(RunSpec(name="q8", assembly="tiny-qformer-opt", connector_options={"num_query_tokens": 4}, stage2_steps=1))
    assert raw["name"] == "q8" and raw["connector"]["options"] == {"variant": "tiny", "num_query_tokens": 4, "ln_vision_eps": 1.0e-6}


def test_retrieval_claim_sets_itm_against_a_clip_rows_itc(tmp_path):
    """BLIP-2 claims its Q-Former (ITM re-ranking) retrieves better than the CLIP model under it (ITC
    only): a key pair with such a reference row also compares a's ITM column with b's ITC column."""
    clip_hits = [1] * (IMAGES // 4) + [0] * (IMAGES - IMAGES // 4)  # 25% against q's 50%
    clip = {"seed": None, "eval": {"test": {"retrieval": {"items": {
        "i2t": {"image_id": list(range(IMAGES)), "itc_hit1": clip_hits},
        "t2i": {"text_key": [f"{i}:0" for i in range(IMAGES)], "image_id": list(range(IMAGES)), "itc_hit1": clip_hits}}}}}}
    results = write_report(tmp_path, {"name": "t"}, _rows(), [], references={"clip": clip}, key_pairs=[("q", "clip"), ("q", "q-sup")])
    key = {(d["a"], d["b"], d["metric"]): d for d in results["significance"]["key"]}
    for direction in ("i2t", "t2i"):
        claim = key[("q", "clip", f"R@1 {direction} vs R@1 {direction} ITC")]
        assert claim["diff"] == pytest.approx(25.0) and claim["n_items"] == IMAGES
        assert key[("q", "clip", f"R@1 {direction} ITC")]["diff"] == pytest.approx(25.0)  # the same column, as before
        assert ("q", "clip", f"R@1 {direction}") not in key  # the CLIP row has no ITM column
    assert not any(" vs " in metric for a, b, metric in key if b == "q-sup")  # both rows have ITM: no cross-column pair
    assert "| q − clip | R@1 i2t vs R@1 i2t ITC | +25.0 [" in (tmp_path / "report.md").read_text()


def test_a_compare_of_fewer_runs_or_seeds_names_the_results_its_folder_holds_besides(tmp_path):
    """A config that no longer lists a run (or a seed) reports without it; the report says so, with where
    each left-out result lies and how to report it, rather than silently showing less than the folder holds."""
    from types import SimpleNamespace

    from vlbridge.compare.run import COMPARE_RERUN, results_left_out

    for name, seed in (("q", 0), ("q", 1), ("lin", 0), ("old", 0)):
        (tmp_path / "runs" / name / f"seed-{seed}").mkdir(parents=True)
        (tmp_path / "runs" / name / f"seed-{seed}" / "result.json").write_text("{}", encoding="utf-8")
    (tmp_path / "runs" / "unfinished" / "seed-0").mkdir(parents=True)  # no result: nothing to report
    config = SimpleNamespace(output_dir=str(tmp_path), runs=[SimpleNamespace(name="q"), SimpleNamespace(name="lin")], seeds=[0])
    left_out = results_left_out(config)
    assert left_out == [{"run": "old", "seed": 0, "path": "runs/old/seed-0/result.json"},
                        {"run": "q", "seed": 1, "path": "runs/q/seed-1/result.json"}]
    results = write_report(tmp_path, {"name": "t"}, {"q": [_result(0, 3, False)], "lin": [_result(0, 2, False)]}, [],
                           left_out=(left_out, COMPARE_RERUN))
    assert results["not_reported"] == left_out
    head = (tmp_path / "report.md").read_text(encoding="utf-8").split("## ")[0]
    assert ("stored results of 2 other run/seed pairs, not shown or compared here: old seed 0 (runs/old/seed-0/result.json), "
            "q seed 1 (runs/q/seed-1/result.json)") in head and "add them to the config's runs and seeds" in head
    write_report(tmp_path, {"name": "t"}, {"q": [_result(0, 3, False)]}, [])
    assert "This report covers only" not in (tmp_path / "report.md").read_text(encoding="utf-8")
