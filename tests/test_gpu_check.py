"""bench/gpu_check.py's CPU dry run (how the script is checked without a GPU) runs to its report:
the FSDP case says it was skipped for want of GPUs instead of failing on an import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_dry_run_reports_fsdp_skipped(tmp_path: Path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--variant", "tiny", "--reps", "1",
                           "--batch", "2", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["fsdp"] == {"skipped": "0 GPU(s); FSDP needs 2"}
