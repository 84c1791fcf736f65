"""bench/gpu_check.py's CPU dry run (how the script is checked without a GPU) runs to its report:
the FSDP case says it was skipped for want of GPUs instead of failing on an import. Without CUDA
the script says there is nothing to check, however CUDA is spelled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_dry_run_reports_fsdp_skipped(tmp_path: Path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--variant", "tiny", "--reps", "1",
                           "--batch", "2", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["fsdp"] == {"skipped": "0 GPU(s); FSDP needs 2"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_without_cuda_it_says_so_for_any_cuda_spelling(device: str, tmp_path: Path):
    """--device cuda:0 died in torch's CUDA init (RuntimeError: Found no NVIDIA driver) instead of
    saying that there is nothing to check here."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", device], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no CUDA device here" in done.stdout


def test_a_device_it_cannot_check_is_a_usage_error(tmp_path: Path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "gpu"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "argument --device" in done.stderr
