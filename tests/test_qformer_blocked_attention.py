"""Training attention with dropout computed block by block (`qformer_attention`) gives the eager
reference's numbers bit for bit: the same outputs and gradients from the same seed, so seeded
stage-1 runs keep their losses."""

from __future__ import annotations

import pytest
import torch

from vlbridge.errors import VLBridgeError
from vlbridge.parts.attention import attention, set_attention_backend
from vlbridge.plugins.connectors import qformer_attention
from vlbridge.plugins.connectors.qformer_attention import blocked_dropout_attention, sees_some_key
from vlbridge.plugins.connectors.qformer_layers import Attention

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _qkv(batch: int, heads: int, length: int, keys: int, head_dim: int) -> list[torch.Tensor]:
    """q as the Q-Former makes it (a head-transposed view), k and v contiguous, all requiring grad."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, length, heads, head_dim, generator=g).transpose(1, 2)
    k, v = torch.randn(2, batch, heads, keys, head_dim, generator=g)
    return [t.requires_grad_() for t in (q, k, v)]


def _run(fn, q, k, v, seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    out = fn()
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    return [out.detach(), *grads]


@pytest.mark.parametrize("mask_kind", ["none", "per_sample", "shared"])
@pytest.mark.parametrize("block_bytes", [1 << 20, 4])  # one block; the fewest rows whose draws fill whole words
@pytest.mark.parametrize("heads", [4, 1])  # 4 x 6 x 9 scores per batch row, or 54: not a multiple of 4 draws
def test_blocked_equals_eager_bit_for_bit(monkeypatch: pytest.MonkeyPatch, mask_kind: str, block_bytes: int, heads: int):
    monkeypatch.setattr(qformer_attention, "BLOCK_BYTES", block_bytes)
    q, k, v = _qkv(batch=5, heads=heads, length=6, keys=9, head_dim=8)
    mask = {"none": None,
            "per_sample": torch.rand(5, 1, 6, 9, generator=torch.Generator().manual_seed(2)) > 0.4,
            "shared": torch.ones(9, 9, dtype=torch.bool).tril()[3:]}[mask_kind]
    if mask is not None:
        mask[..., 0] = True  # every row sees a key
    eager = _run(lambda: attention(q, k, v, mask, dropout_p=0.1, backend="eager"), q, k, v, seed=7)
    blocked = _run(lambda: blocked_dropout_attention(q, k, v, mask, 0.1), q, k, v, seed=7)
    for a, b in zip(eager, blocked):
        assert torch.equal(a, b)
    assert not torch.allclose(blocked[0], attention(q, k, v, mask).detach())  # dropout did drop something


def test_the_layer_trains_on_the_blocked_path_with_the_reference_numbers(monkeypatch: pytest.MonkeyPatch):
    torch.manual_seed(0)
    layer = Attention(16, 24, heads=4, eps=1e-12, dropout=0.5).train()
    x, context = torch.randn(2, 5, 16), torch.randn(2, 7, 24)
    calls = []
    monkeypatch.setattr("vlbridge.plugins.connectors.qformer_layers.blocked_dropout_attention",
                        lambda *args: calls.append(1) or blocked_dropout_attention(*args))
    results = []
    for backend in (None, "eager"):  # None: automatic (blocked); eager: the forced reference
        set_attention_backend(backend)
        try:
            torch.manual_seed(3)
            out = layer(x, context)
            out.sum().backward()
            results.append([out.detach(), *(p.grad.clone() for p in layer.parameters())])
            layer.zero_grad(set_to_none=True)
        finally:
            set_attention_backend(None)
    assert calls == [1]
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_rows_that_see_no_key_leave_the_blocked_path():
    mask = torch.ones(2, 1, 3, 4, dtype=torch.bool)
    assert sees_some_key(mask) and sees_some_key(None)
    mask[1, 0, 2] = False
    assert not sees_some_key(mask)


def test_forced_xformers_is_refused_in_training_on_cpu_too(monkeypatch: pytest.MonkeyPatch):
    """VLBRIDGE_ATTENTION=xformers on CPU: a training pass with dropout is refused as an eval pass is,
    not run on the blocked CPU path in xformers' place."""
    monkeypatch.setenv("VLBRIDGE_ATTENTION", "xformers")
    layer = Attention(16, 16, heads=4, eps=1e-12, dropout=0.1)
    x = torch.randn(2, 5, 16)
    for mode in (False, True):
        with pytest.raises(VLBridgeError, match="xformers.*forced.*cpu"):
            layer.train(mode)(x)
