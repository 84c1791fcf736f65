"""bench/bench_caption.py compares what the two sides generate: token ids (many of the tiny
tokenizer's ids decode to the same text), on a model whose captions depend on the image (at
transformers' init every image got the same token repeated, so equal outputs proved nothing)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vlbridge
from tests.bench_scripts import load_bench as bench_module

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load_bench(monkeypatch: pytest.MonkeyPatch):
    return bench_module("bench_caption", monkeypatch)


def test_sides_give_the_same_token_ids_and_each_image_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    bench = load_bench(monkeypatch)
    bench.make_source(tmp_path / "hf")
    vlbridge.import_hf_blip2(tmp_path / "hf", tmp_path / "ours")
    args = argparse.Namespace(batch=2, beams=2, tokens=4)
    outputs = {}
    for side in ("transformers", "ours"):
        _, step = bench.make_step(side, tmp_path, args)
        with torch.inference_mode():
            outputs[side] = step()
    assert all(isinstance(token, int) for row in outputs["ours"] for token in row), outputs["ours"]
    assert outputs["ours"] == outputs["transformers"]
    first, second = outputs["ours"]
    assert first != second, "both images got the same caption: the check would not see an image ignored"
    assert len(set(first)) > 1, "one token repeated: the model's outputs are degenerate"


def test_the_bench_runs_end_to_end_at_a_tiny_size(tmp_path: Path):
    """Both sides in their subprocesses, from another working directory, to the documented report."""
    out = tmp_path / "results" / "caption.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_caption.py"), "--batch", "2", "--beams", "2",
                           "--tokens", "3", "--reps", "2", "--json", str(out)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report == json.loads(done.stdout[done.stdout.index("{"):])
    assert report["identical_captions"] is True
    assert report["settings"] == {"batch": 2, "beams": 2, "new_tokens": 3, "reps": 2, "side_by_side": True,
                                  "fixed_mmap_threshold": True, "ours_cache": "shared prompt", "ours_linear": "torch"}
    assert set(report["images_per_cpu_s"]) == {"ours", "transformers"}
    ratio = report["images_per_cpu_s"]["ours"] / report["images_per_cpu_s"]["transformers"]
    assert report["throughput_ratio_ours_over_transformers"] == pytest.approx(ratio)
    assert [p.name for p in out.parent.iterdir()] == ["caption.json"]  # no temporary file left beside it


def test_ours_linear_onednn_puts_ours_on_onednns_kernels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The experiment's switch reaches the ours side (and only it): F.linear is replaced there."""
    import torch.nn.functional as F

    bench = load_bench(monkeypatch)
    if not bench_module("onednn_linear", monkeypatch).available():
        pytest.skip("this torch has no oneDNN linear op")
    monkeypatch.setattr(F, "linear", F.linear)  # restored after the test
    plain = F.linear
    bench.make_source(tmp_path / "hf")
    vlbridge.import_hf_blip2(tmp_path / "hf", tmp_path / "ours")
    args = argparse.Namespace(batch=2, beams=2, tokens=3, ours_linear="onednn")
    bench.make_step("transformers", tmp_path, args)
    assert F.linear is plain
    _, step = bench.make_step("ours", tmp_path, args)
    assert F.linear is not plain
    with torch.inference_mode():
        tokens = step()
    assert len(tokens) == 2 and all(len(row) == 3 for row in tokens)
