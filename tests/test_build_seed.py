"""Building is deterministic: the same assembly gives the same weights (connector, and the tiny
encoder and LLM) and the same outputs whatever the caller's random state, without moving it."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import vlbridge

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMAGES = [Image.new("RGB", (40, 40), (220, 20, 20)), Image.new("RGB", (40, 40), (20, 20, 220))]
TEXTS = ["a red square", "a blue square", "a cat"]


def all_tensors(model: vlbridge.VLBridgeModel) -> dict[str, torch.Tensor]:
    return {**model.state_dict(), **{f"llm.model.{k}": v for k, v in model.llm.model.state_dict().items()}}


def build_after_drawing(preset: str, draws: int, **options) -> tuple[vlbridge.VLBridgeModel, bool]:
    """Build with the global generator somewhere else each time; says whether the build moved it."""
    torch.manual_seed(draws)
    torch.rand(draws)
    before = torch.get_rng_state()
    model = vlbridge.build(preset, **options)
    return model, torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("preset", ["tiny-qformer-opt", "tiny-mlp-opt"])
def test_two_builds_are_identical_and_leave_the_global_rng_alone(preset):
    first, untouched_first = build_after_drawing(preset, 1)
    second, untouched_second = build_after_drawing(preset, 7)
    assert untouched_first and untouched_second
    a, b = all_tensors(first), all_tensors(second)
    assert a.keys() == b.keys() and [name for name in a if not torch.equal(a[name], b[name])] == []
    if preset == "tiny-qformer-opt":
        one, two = first.retrieve(IMAGES, TEXTS, k=2), second.retrieve(IMAGES, TEXTS, k=2)
        assert torch.equal(one.itc, two.itc) and torch.equal(one.i2t, two.i2t) and torch.equal(one.t2i, two.t2i)


def test_init_seed_chooses_the_connector_not_the_frozen_parts():
    default, _ = build_after_drawing("tiny-qformer-opt", 1)
    other, untouched = build_after_drawing("tiny-qformer-opt", 1, init_seed=5)
    assert untouched
    assert not torch.equal(default.connector.query_tokens, other.connector.query_tokens)
    assert all(torch.equal(p, q) for p, q in zip(default.encoder.parameters(), other.encoder.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(default.llm.parameters(), other.llm.parameters()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_build_leaves_the_cuda_generator_alone():
    torch.cuda.manual_seed_all(3)
    before = torch.cuda.get_rng_state_all()
    vlbridge.build("tiny-mlp-opt", device="cuda")
    assert all(torch.equal(x, y) for x, y in zip(torch.cuda.get_rng_state_all(), before))
