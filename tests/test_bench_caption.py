"""bench/bench_caption.py compares what the two sides generate: token ids (many of the tiny
tokenizer's ids decode to the same text), on a model whose captions depend on the image (at
transformers' init every image got the same token repeated, so equal outputs proved nothing)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vlbridge

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load_bench(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # as `python bench/bench_caption.py` has it: its helpers sit beside it
    spec = importlib.util.spec_from_file_location("bench_caption", ROOT / "bench" / "bench_caption.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
                                  "fixed_mmap_threshold": True, "ours_cache": "shared prompt"}
    assert set(report["images_per_cpu_s"]) == {"ours", "transformers"}
    ratio = report["images_per_cpu_s"]["ours"] / report["images_per_cpu_s"]["transformers"]
    assert report["throughput_ratio_ours_over_transformers"] == pytest.approx(ratio)
    assert [p.name for p in out.parent.iterdir()] == ["caption.json"]  # no temporary file left beside it
