"""bench/bench_qformer.py stops before timing when the two sides compute different things: it printed
the difference and timed them anyway, so a broken weight conversion still gave ratios and exit 0."""

from __future__ import annotations

import pytest
import torch

from tests.bench_scripts import load_bench


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    return load_bench("bench_qformer", monkeypatch)


def test_sides_that_differ_stop_the_bench_before_timing(bench, monkeypatch):
    torch.manual_seed(0)
    sides = {"ours": torch.nn.Linear(8, 4), "transformers": torch.nn.Linear(8, 4)}  # other weights: another computation
    monkeypatch.setattr(bench, "build_pair", lambda side: sides[side])
    monkeypatch.setattr(bench, "make_image", lambda batch: torch.randn(batch, 8))
    monkeypatch.setattr(bench, "timed", lambda step: pytest.fail("timed although the outputs differ"))
    with pytest.raises(SystemExit, match=r"connector outputs differ by .* \(more than 0.0001\): they do not compute the same"):
        bench.compare(batch=2, reps=1)
    sides["transformers"].load_state_dict(sides["ours"].state_dict())
    monkeypatch.setattr(bench, "timed", lambda step: (step(), (0.5, 0.5))[1])
    monkeypatch.setattr(bench, "allocator_peak_mb", lambda step, model, image: 0.0)
    assert bench.compare(batch=2, reps=1)["max_abs_diff"] == 0.0


def test_a_failing_memory_child_shows_its_error_and_gets_the_threads(bench, monkeypatch):
    """It ran without --threads and failed as a bare CalledProcessError, its stderr unseen."""
    import subprocess

    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="RuntimeError: out of memory")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    with pytest.raises(SystemExit, match=r"memory measurement of 'ours' failed \(exit 1\):\nRuntimeError: out of memory"):
        bench.measure_memory("ours", 2, threads=1)
    assert seen["cmd"][-2:] == ["--threads", "1"]
