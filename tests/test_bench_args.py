"""The bench scripts refuse a count below 1 (or a dropout outside [0, 1]) as a usage error, exit 2
with argparse's message, before building anything: they used to die with a traceback
(ZeroDivisionError, 'no median for empty data', set_num_threads) after the models were built,
and gpu_check reported every backend as failed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench_scripts import BENCH, load_bench


def run_main(script: str, args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """The script's main() in this process, with `args` as its command line: (exit code, stderr).
    argparse's refusals come before anything is built, so a fresh interpreter per case (about 2 s
    each) would test nothing more; test_a_script_run_from_the_shell_refuses_as_in_process checks that."""
    module = load_bench(script.removesuffix(".py"), monkeypatch)
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(SystemExit) as stopped:
        module.main()
    return stopped.value.code, capsys.readouterr().err

CASES = [
    ("bench_caption.py", ["--reps", "0"]),
    ("bench_qformer.py", ["--threads", "-1"]),
    ("bench_train.py", ["--steps", "0"]),
    ("bench_train.py", ["--dropout", "1.5"]),
    ("profile_caption.py", ["--reps", "0"]),
    ("profile_qformer.py", ["--reps", "0"]),
    ("gpu_check.py", ["--device", "cpu", "--reps", "0"]),
    ("stage1_handover.py", ["--out", "unused", "--stage2-steps", "0"]),
    ("probe_cpu_gemm.py", ["--reps", "0"]),
]


@pytest.mark.parametrize("script, args", CASES, ids=[f"{s} {' '.join(a)}" for s, a in CASES])
def test_bad_count_is_a_usage_error(script: str, args: list[str], tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = run_main(script, args, monkeypatch, capsys)
    assert code == 2, err[-2000:]
    assert f"argument {args[-2]}" in err and "usage:" in err
    assert not any(tmp_path.iterdir())  # nothing written or built


def test_a_script_run_from_the_shell_refuses_as_in_process(tmp_path: Path):
    """One case as a user runs it: exit 2, argparse's message, no traceback, nothing written."""
    done = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--device", "cpu", "--reps", "0"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "argument --reps" in done.stderr and "usage:" in done.stderr
    assert not any(tmp_path.iterdir())



OUTPUTS = [  # "blocker" is a file: nothing can be written under it
    ("bench_caption.py", ["--json", "blocker/out.json"]),
    ("bench_qformer.py", ["--json", "blocker/out.json"]),
    ("bench_train.py", ["--json", "blocker/out.json"]),
    ("gpu_check.py", ["--device", "cpu", "--out", "."]),
    ("stage1_handover.py", ["--out", "blocker"]),
    ("probe_cpu_gemm.py", ["--json", "blocker/out.json"]),
]


@pytest.mark.parametrize("script, args", OUTPUTS, ids=[f"{s} {' '.join(a)}" for s, a in OUTPUTS])
def test_output_that_cannot_be_written_is_a_usage_error(script: str, args: list[str], tmp_path: Path, monkeypatch, capsys):
    """Checked before the run: it was a traceback from open() after the whole measurement."""
    (tmp_path / "blocker").write_text("a file, not a folder\n")
    monkeypatch.chdir(tmp_path)
    code, err = run_main(script, args, monkeypatch, capsys)
    assert code == 2, err[-2000:]
    assert f"argument {args[-2]}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]
