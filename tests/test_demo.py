"""`vlbridge demo --quick` end to end: the world, the frozen parts, two-stage Q-Former training,
the projector baselines, the ablations, every metric, and a complete report - and the trained
bridges must beat a model that never looks at the image."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from vlbridge.cli.main import main
from vlbridge.demo import demo_config

RUNS = ["qformer-32q", "qformer-32q-no-stage1", "qformer-8q", "linear", "mlp"]
STAGE1_RUNS = ["qformer-32q", "qformer-8q"]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out


def test_report_is_complete(demo_out: Path, capsys: pytest.CaptureFixture[str]):
    results = json.loads((demo_out / "results.json").read_text(encoding="utf-8"))
    assert list(results["runs"]) == RUNS + ["blind prior"]
    tokens = {"qformer-32q": 32, "qformer-32q-no-stage1": 32, "qformer-8q": 8, "linear": 65, "mlp": 65}
    for name in RUNS:
        (run,) = results["runs"][name]
        assert run["cost"]["visual_tokens"] == tokens[name] and run["cost"]["llm_forward_ms"] > 0
        test = run["eval"]["test"]
        assert {"CIDEr", "Bleu_4", "ROUGE_L"} <= set(test["caption"]) and test["caption"]["tokenizer"]
        assert set(test["vqa"]["per_question_type"]) >= {"how many", "what color is the", "what shape is the"}
        assert run["eval"]["comp"]["vqa"]["overall"] is not None
        assert ("retrieval" in test) == (name in STAGE1_RUNS)
        stages = [s for s in ("stage1", "stage2") if s in run["train"]]
        assert stages == (["stage1", "stage2"] if name in ("qformer-32q", "qformer-8q") else ["stage2"])
    report = (demo_out / "report.md").read_text(encoding="utf-8")
    for name in RUNS + ["blind prior"]:
        assert f"| {name} |" in report
    assert "per question type" in report and "VQA comp %" in report
    with Image.open(demo_out / "report.png") as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 200


def chance_recall(num_images: int, num_texts: int) -> float:
    """Mean of R@1/5/10 in both directions (percent) for a random ranking, every image with
    num_texts / num_images captions of its own (the world's scenes are distinct)."""
    own = num_texts // num_images
    i2t = [100 * (1 - math.comb(num_texts - own, k) / math.comb(num_texts, k)) for k in (1, 5, 10)]
    t2i = [100 * k / num_images for k in (1, 5, 10)]
    return sum(i2t + t2i) / 6


def test_trained_bridges_beat_a_blind_model(demo_out: Path):
    """Stage-1 retrieval above chance; the trained bridges' VQA above the blind answer prior.
    The quick run trains for seconds on 32 test images, where one R@1 hit is 3 points: retrieval is
    judged on R@1/5/10 in both directions together (ITC, both Q-Former runs), against the exact
    chance value. The margins are modest; the full demo is the experiment."""
    results = json.loads((demo_out / "results.json").read_text(encoding="utf-8"))
    for name in STAGE1_RUNS:
        retrieval = results["runs"][name][0]["eval"]["test"]["retrieval"]
        assert retrieval["distinct_scenes"] == retrieval["num_images"]
        recall = sum(retrieval["itc"][f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)) / 6
        chance = chance_recall(retrieval["num_images"], retrieval["num_texts"])
        assert recall >= 1.4 * chance, (name, retrieval["itc"], chance)
    summary = results["summary"]
    trained_vqa = [summary[name]["VQA %"]["mean"] for name in RUNS]
    assert sum(trained_vqa) / len(trained_vqa) > summary["blind prior"]["VQA %"]["mean"] + 3, (trained_vqa, summary["blind prior"]["VQA %"])


def test_rerun_reuses_everything(demo_out: Path, capsys: pytest.CaptureFixture[str]):
    """A second run finds the world, caches and checkpoints and only re-evaluates."""
    assert main(["demo", "--quick", "--out", str(demo_out), "--runs", "linear"]) == 0
    err = capsys.readouterr().err
    assert "reusing the world" in err and "reusing its results" in err
    assert "caching frozen encoder features" not in err and "stage 2, " not in err  # nothing trained again


def test_unknown_run_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--runs", "qformer-99q"]) == 2
    assert "unknown demo run" in capsys.readouterr().err


def test_full_plan_is_the_documented_budget():
    config, plan = demo_config(Path("out"), quick=False, seeds=[0], queries=[8, 32])
    assert [r.name for r in config.runs] == RUNS
    runs = {r.name: r for r in config.runs}
    total = plan["steps"][0] + plan["steps"][1]
    for name in ("qformer-32q", "qformer-8q", "linear", "mlp"):  # every connector gets the same optimizer steps
        assert runs[name].stage1_steps + runs[name].stage2_steps == total, name
    ablation = runs["qformer-32q-no-stage1"]  # BLIP-2's ablation: the same stage 2, no stage 1
    assert (ablation.stage1_steps, ablation.stage2_steps) == (0, runs["qformer-32q"].stage2_steps)
    assert ablation.connector_options == runs["qformer-32q"].connector_options
