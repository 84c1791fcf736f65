"""Passes whose caller reads only the first positions (ITM: the queries; ITC's text: [CLS]) compute
only those rows in the last layer, with the same outputs and gradients as the full pass."""

from __future__ import annotations

import pytest
import torch

from tests.test_qformer import image_text_inputs
from vlbridge.plugins.connectors.qformer import QFormerOptions
from vlbridge.plugins.connectors.qformer_model import build
from vlbridge.plugin.specs import TokenShape

Q, N, E = 4, 6, 48

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def qformer():
    torch.manual_seed(0)
    return build(QFormerOptions(variant="tiny", num_query_tokens=Q, num_layers=2), TokenShape(N, E), 0).eval()


def _outputs_and_grads(qformer, compute) -> list[torch.Tensor]:
    """The output and every parameter's gradient (zeros where none reached it: the full pass's unread
    rows give the last text FFN zero gradients, the trimmed pass none)."""
    qformer.zero_grad(set_to_none=True)
    out = compute()
    out.pow(2).sum().backward()
    return [out.detach(), *(torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in qformer.parameters())]


@pytest.mark.parametrize("pass_name", ["multimodal", "text"])
def test_last_rows_equal_the_full_pass_with_their_gradients(qformer, pass_name: str):
    image, ids, mask = image_text_inputs([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], N, E)
    if pass_name == "multimodal":
        full = lambda: qformer.multimodal_outputs(ids, mask, image)[:, :Q]
        trimmed = lambda: qformer.multimodal_outputs(ids, mask, image, last_rows=Q)
    else:
        full = lambda: qformer.text_outputs(ids, mask)[:, :1]
        trimmed = lambda: qformer.text_outputs(ids, mask, last_rows=1)
    expected, got = _outputs_and_grads(qformer, full), _outputs_and_grads(qformer, trimmed)
    assert got[0].shape == expected[0].shape
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_stage1_heads_read_trimmed_passes(qformer, monkeypatch: pytest.MonkeyPatch):
    image, ids, mask = image_text_inputs([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], N, E)
    seen = []
    run = qformer._run
    monkeypatch.setattr(qformer, "_run", lambda *args, **kwargs: seen.append(kwargs.get("last_rows")) or run(*args, **kwargs))
    qformer.itm_logits(ids, mask, image)
    qformer.text_features(ids, mask)
    assert seen == [Q, 1]
