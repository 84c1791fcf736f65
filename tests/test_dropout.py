"""vlbridge.parts.dropout: the cheaper CPU dropout mask is a real dropout (rate, scale, gradient, seeding),
and the Q-Former's attention-probability dropout on CPU uses it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlbridge.parts.attention import attention
from vlbridge.parts.dropout import Dropout, drop_threshold, dropout, keep_mask
from vlbridge.errors import VLBridgeError


def test_drop_rate_and_scale_match_p():
    mask = keep_mask((400, 1000), 0.1)
    dropped = (mask == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.003  # 400k draws: sd ~0.0005
    kept = mask[mask != 0]
    assert torch.allclose(kept, torch.full_like(kept, 32768 / (32768 - drop_threshold(0.1))))
    assert abs(mask.mean().item() - 1.0) < 0.004  # inverted dropout keeps the expectation


def test_threshold_is_p_rounded_to_15_bits():
    assert drop_threshold(0.1) == 3277
    assert drop_threshold(0.0) == 0 and drop_threshold(1.0) == 32768
    with pytest.raises(VLBridgeError, match=r"\[0, 1\]"):
        drop_threshold(1.5)


def test_all_four_quarters_of_each_word_are_used_and_independent():
    dropped = (keep_mask((200_000,), 0.5) == 0).float().view(-1, 4)  # one 64-bit word per row
    assert all(abs(dropped[:, i].mean().item() - 0.5) < 0.01 for i in range(4))
    for i in range(3):  # neighbours are not correlated
        assert abs((dropped[:, i] * dropped[:, i + 1]).mean().item() - 0.25) < 0.01


def test_seeded_and_gradient_is_the_mask():
    x = torch.randn(6, 7, requires_grad=True)
    torch.manual_seed(3)
    y1 = dropout(x, 0.3)
    torch.manual_seed(3)
    y2 = dropout(x, 0.3)
    assert torch.equal(y1, y2)
    y1.sum().backward()
    scale = 32768 / (32768 - drop_threshold(0.3))
    assert torch.allclose(x.grad, (y1 != 0).float() * scale)
    assert torch.allclose(y1, x.detach() * x.grad)


def test_identity_in_eval_and_module_is_an_nn_dropout():
    x = torch.randn(4, 5)
    module = Dropout(0.5)
    assert isinstance(module, torch.nn.Dropout) and module.p == 0.5
    module.eval()
    assert module(x) is x
    assert dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    module.train()
    assert (module(x) == 0).any()


def test_cpu_attention_dropout_is_eager_math_with_our_mask():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)
    mask = torch.rand(2, 1, 5, 9) > 0.3
    mask[..., 0] = True
    torch.manual_seed(11)
    out = attention(q, k, v, mask, dropout_p=0.2)
    torch.manual_seed(11)
    keep = keep_mask((2, 3, 5, 9), 0.2)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(8)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    assert torch.allclose(out, (probs * keep) @ v, atol=1e-6)
    assert torch.allclose(attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-6)
