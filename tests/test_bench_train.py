"""bench/bench_train.py's assemblies: --heads applies to the BLIP-2-size Q-Former too (it was
overwritten by BLIP-2's 12 heads, so `--qformer blip2 --heads 3` timed 12 heads and said 3)."""

from __future__ import annotations

import pytest

from tests.bench_scripts import load_bench


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    return load_bench("bench_train", monkeypatch)


@pytest.mark.parametrize("qformer", ["mini", "blip2"])
def test_heads_option_reaches_the_connector(bench, qformer: str):
    options = bench.assembly(1, heads=3, qformer=qformer)["connector"]["options"]
    assert options["num_heads"] == 3


def test_blip2_default_keeps_blip2s_heads(bench):
    options = bench.assembly(1, qformer="blip2")["connector"]["options"]
    assert (options["hidden_size"], options["num_heads"], options["num_layers"]) == (768, 12, 12)
