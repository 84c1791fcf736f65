"""bench/probe_world_llm.py runs end to end on quickly trained world readers and reports every category."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench_scripts import load_bench
from vlbridge.world.language import QUESTION_KINDS
from vlbridge.world.train_parts import main as train_parts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Path:
    """Quickly trained readers, trained once for the module: the tests read them, none changes them."""
    out = tmp_path_factory.mktemp("parts")
    assert train_parts(["--out", str(out), "--quick", "--parts", "opt,flan-t5"]) == 0
    return out


def test_probe_reports_each_category_with_and_without_context(tmp_path: Path, parts: Path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "probe_world_llm.py"), "--model", str(parts / "opt"),
                           "--model", str(parts / "flan-t5"), "--images", "6", "--batch", "4",
                           "--json", str(tmp_path / "probe.json")],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "probe.json").read_text())
    assert [r["model_type"] for r in results] == ["opt", "t5"] and json.loads(done.stdout.strip().splitlines()[-1]) == results
    for result in results:
        assert (result["images"], result["questions_per_image"]) == (6, 5)
        for context in ("with_captions", "without_context"):
            scores = result[context]
            assert scores["questions"] == 30
            for key in ("overall", *QUESTION_KINDS):
                assert 0.0 <= scores[key] <= 1.0, (context, key)
    assert "with_captions" in done.stdout and "spatial" in done.stdout  # the table


@pytest.mark.usefixtures("one_torch_thread")  # main() sets the thread count: restored after the module
def test_probe_breaks_yes_no_questions_down_by_form_and_answer(tmp_path: Path, parts: Path, capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch):
    """--by-answer: every yes/no question lands in one "form -> answer" cell (a reader that always
    says "no" scores about half on these while reading nothing); --captions N keeps N captions.
    In this process: the first test runs the script as a command."""
    probe = load_bench("probe_world_llm", monkeypatch)
    assert probe.main(["--model", str(parts / "opt"), "--images", "8", "--questions", "10", "--batch", "8", "--captions", "6",
                       "--by-answer", "--json", str(tmp_path / "probe.json")]) == 0
    out = capsys.readouterr().out
    (result,) = json.loads((tmp_path / "probe.json").read_text())
    assert result["captions"] == 6
    cells = result["yes_no_by_answer"]
    forms = {"is there", "cell", "to the left of", "to the right of", "above", "below"}
    assert cells and all(key.rsplit(" -> ", 1)[0] in forms and key.endswith(("-> yes", "-> no")) for key in cells)
    asked = sum(qa.category in ("spatial", "exist") for qa in _questions(8, 10))
    assert sum(cell["questions"] for cell in cells.values()) == asked
    assert all(0.0 <= cell["accuracy"] <= 1.0 for cell in cells.values()) and "-> " in out


def _questions(images: int, per_image: int) -> list:
    from vlbridge.world import WorldConfig
    from vlbridge.world.generate import make_image

    world = WorldConfig(seed=0, questions_per_image=per_image)
    return [qa for i in range(images) for qa in make_image(world, "val", i).qas]


def test_a_caption_count_below_one_is_a_usage_error():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "probe_world_llm.py"), "--captions", "0"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "at least 1" in done.stderr and "Traceback" not in done.stderr


def test_out_of_range_counts_are_usage_errors(capsys, monkeypatch):
    """`--questions 11` died with a pydantic traceback from WorldConfig, and `--images 0` printed a
    table of zeros over no questions; both are now argparse errors (exit 2) naming the range."""
    probe = load_bench("probe_world_llm", monkeypatch)
    for argv, words in ((["--questions", "11"], "from 1 to 10"), (["--questions", "0"], "from 1 to 10"), (["--images", "0"], "at least 1")):
        with pytest.raises(SystemExit) as exit_info:
            probe.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and words in err and "Traceback" not in err, (argv, err)
