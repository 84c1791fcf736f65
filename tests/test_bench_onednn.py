"""bench/onednn_linear.py and bench/probe_cpu_gemm.py: issue 21's experiment with oneDNN's fp32
kernels. The patched F.linear must give torch's results up to rounding where it applies, and leave
every call it does not apply to (autograd, other dtypes) on torch's own path, bit for bit."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.bench_scripts import load_bench

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def onednn(monkeypatch: pytest.MonkeyPatch):
    module = load_bench("onednn_linear", monkeypatch)
    if not module.available():
        pytest.skip("this torch has no oneDNN linear op")
    monkeypatch.setattr(F, "linear", F.linear)  # install() replaces it: restored after the test
    return module


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_the_patched_linear_gives_torchs_results_up_to_rounding(onednn, packed: bool):
    plain = F.linear
    onednn.install(packed=packed)
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(48, 80)
    for shape in [(20, 48), (3, 7, 48), (1, 48)]:  # the first call's rows size a packed weight; later ones differ
        x = torch.randn(shape, generator=generator)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), plain(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert F.linear is not plain


def test_calls_with_autograd_or_another_dtype_stay_on_torchs_path(onednn):
    plain = F.linear
    onednn.install(packed=True)
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(5, 16, requires_grad=True)
    out = F.linear(x, layer.weight, layer.bias)
    assert torch.equal(out, plain(x, layer.weight, layer.bias)) and out.requires_grad
    out.sum().backward()
    assert x.grad is not None
    with torch.no_grad():
        doubled = layer.double()
        assert torch.equal(F.linear(x.double(), doubled.weight, doubled.bias), plain(x.double(), doubled.weight, doubled.bias))


def test_the_probe_reports_each_shape(onednn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    probe = load_bench("probe_cpu_gemm", monkeypatch)
    monkeypatch.setattr(probe, "SHAPES", {"small": (20, 64, 96), "square": (64, 64, 64)})
    monkeypatch.setattr(sys, "argv", ["probe_cpu_gemm.py", "--reps", "2", "--json", str(tmp_path / "gemm.json")])
    assert probe.main() == 0
    report = json.loads((tmp_path / "gemm.json").read_text())
    assert report == json.loads(capsys.readouterr().out)
    assert set(report["shapes"]) == {"small", "square"}
    for row in report["shapes"].values():
        assert all(row[key] > 0 for key in ("torch_gflops", "onednn_gflops", "onednn_packed_gflops"))
        assert isinstance(row["onednn_bit_equal"], bool) and row["onednn_max_abs_difference"] < 1e-4
