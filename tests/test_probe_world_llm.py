"""bench/probe_world_llm.py runs end to end on quickly trained world readers and reports every category."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from vlbridge.world.language import QUESTION_KINDS
from vlbridge.world.train_parts import main as train_parts

ROOT = Path(__file__).resolve().parents[1]


def test_probe_reports_each_category_with_and_without_context(tmp_path: Path):
    assert train_parts(["--out", str(tmp_path / "parts"), "--quick", "--parts", "opt,flan-t5"]) == 0
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "probe_world_llm.py"), "--model", str(tmp_path / "parts" / "opt"),
                           "--model", str(tmp_path / "parts" / "flan-t5"), "--images", "6", "--batch", "4",
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
