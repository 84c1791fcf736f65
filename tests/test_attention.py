"""vlbridge.parts.attention: every backend agrees with the eager reference (outputs and gradients), with
no mask, padding masks and the Q-Former's three masks; forcing and naming backends."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlbridge.parts import attention as attn
from vlbridge.errors import VLBridgeError
from vlbridge.plugins.connectors.qformer_masks import bidirectional_mask, multimodal_causal_mask, unimodal_mask

HAS_CUDA = torch.cuda.is_available()
XFORMERS_MISSING = attn._xformers_unavailable() if HAS_CUDA else "xformers kernels run on CUDA only"
B, H, Q, T, DH = 3, 4, 5, 7, 16
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
CUDA_FP32 = dict(atol=1e-4, rtol=1e-3)  # fused CUDA kernels accumulate in another order (online softmax)


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    monkeypatch.delenv(attn.ENV_VAR, raising=False)
    attn.set_attention_backend(None)
    yield
    attn.set_attention_backend(None)


def _text_mask() -> torch.Tensor:
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    return mask


def _masks() -> dict[str, tuple[int, torch.Tensor | None]]:
    """name -> (sequence length, mask)."""
    text = _text_mask()
    return {
        "none": (Q + T, None),
        "padding": (T, text.bool()[:, None, None, :]),
        "unimodal": (Q + T, unimodal_mask(Q, text)),
        "bidirectional": (Q + T, bidirectional_mask(Q, text)),
        "multimodal_causal": (Q + T, multimodal_causal_mask(Q, text)),
    }


def _backends() -> list:
    """(backend, device) pairs: every backend that can run on this machine, compared with eager."""
    needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
    needs_xformers = pytest.mark.skipif(bool(XFORMERS_MISSING), reason=f"xformers cannot run: {XFORMERS_MISSING}")
    return [("sdpa", "cpu"), pytest.param(("sdpa", "cuda"), marks=needs_cuda), pytest.param(("xformers", "cuda"), marks=needs_xformers)]


def _run(backend: str, qkv: list[torch.Tensor], mask: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [t.detach().clone().requires_grad_(True) for t in qkv]
    out = attn.attention(*leaves, mask, backend=backend)
    out.backward(torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out).to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("case", _backends(), ids=lambda case: "-".join(case))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_name", list(_masks()))
def test_backend_matches_eager(case: tuple[str, str], dtype: torch.dtype, mask_name: str):
    backend, device = case
    length, mask = _masks()[mask_name]
    gen = torch.Generator().manual_seed(0)
    qkv = [torch.randn(B, H, length, DH, generator=gen).to(device, dtype) for _ in range(3)]
    mask = None if mask is None else mask.to(device)
    out, grads = _run(backend, qkv, mask)
    ref_out, ref_grads = _run("eager", qkv, mask)
    assert out.shape == (B, H, length, DH)
    tolerance = CUDA_FP32 if (device, dtype) == ("cuda", torch.float32) else TOLERANCE[dtype]
    torch.testing.assert_close(out, ref_out, **tolerance)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, **tolerance)


def test_eager_masking_is_what_the_mask_says():
    """A masked key contributes nothing: changing its value leaves the output unchanged."""
    q, k, v = (torch.randn(1, 1, 3, 8) for _ in range(3))
    mask = torch.tensor([[True, False, True]] * 3)
    v2 = v.clone()
    v2[..., 1, :] += 100.0
    same = attn.attention(q, k, v, mask, backend="eager")
    torch.testing.assert_close(same, attn.attention(q, k, v2, mask, backend="eager"))
    assert not torch.allclose(same, attn.attention(q, k, v2, None, backend="eager"))


def test_cross_attention_shapes_differ_in_length():
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)
    out = attn.attention(q, k, v)
    assert out.shape == (2, 3, 4, 8)
    torch.testing.assert_close(out, attn.attention(q, k, v, backend="eager"), atol=1e-5, rtol=1e-4)


def test_auto_choice_on_cpu_is_sdpa():
    assert attn.which_backend("cpu", torch.float32, (64,)) == "sdpa"


def test_env_var_forces_eager(monkeypatch):
    monkeypatch.setenv(attn.ENV_VAR, "eager")
    assert attn.which_backend() == "eager"

    def _no_sdpa(*args, **kwargs):
        raise AssertionError("sdpa must not run when eager is forced")

    monkeypatch.setattr(F, "scaled_dot_product_attention", _no_sdpa)
    q = torch.randn(1, 2, 3, 8)
    assert attn.attention(q, q, q).shape == (1, 2, 3, 8)


def test_set_backend_overrides_env_and_resets(monkeypatch):
    monkeypatch.setenv(attn.ENV_VAR, "eager")
    attn.set_attention_backend("sdpa")
    assert attn.forced_backend() == "sdpa"
    attn.set_attention_backend(None)
    assert attn.forced_backend() == "eager"
    monkeypatch.setenv(attn.ENV_VAR, "auto")
    assert attn.forced_backend() is None


@pytest.mark.skipif(HAS_CUDA, reason="checks the error on a machine without CUDA")
def test_forcing_xformers_without_cuda_is_an_error(monkeypatch):
    with pytest.raises(VLBridgeError, match="CUDA"):
        attn.set_attention_backend("xformers")
    monkeypatch.setenv(attn.ENV_VAR, "xformers")
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(VLBridgeError, match="xformers.*forced.*CUDA"):
        attn.attention(q, q, q)


@pytest.mark.skipif(bool(XFORMERS_MISSING), reason=f"xformers cannot run: {XFORMERS_MISSING}")
def test_forcing_xformers_on_cpu_tensors_is_an_error():
    attn.set_attention_backend("xformers")
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(VLBridgeError, match="cpu"):
        attn.attention(q, q, q)


def test_unknown_names_are_errors(monkeypatch):
    with pytest.raises(VLBridgeError, match="unknown attention backend 'flash'.*xformers, sdpa, eager"):
        attn.set_attention_backend("flash")
    q = torch.randn(1, 1, 2, 8)
    with pytest.raises(VLBridgeError, match="unknown attention backend"):
        attn.attention(q, q, q, backend="math")
    monkeypatch.setenv(attn.ENV_VAR, "cudnn")
    with pytest.raises(VLBridgeError, match="VLBRIDGE_ATTENTION"):
        attn.attention(q, q, q)


def test_float_masks_are_rejected():
    q = torch.randn(1, 1, 2, 8)
    with pytest.raises(VLBridgeError, match="boolean"):
        attn.attention(q, q, q, torch.zeros(2, 2))


def test_xformers_bias_is_aligned_and_matches_mask():
    """The additive bias handed to xformers: row stride a multiple of 8, -inf exactly where masked."""
    mask = multimodal_causal_mask(Q, _text_mask())  # (B, 1, 12, 12): 12 is not a multiple of 8
    bias = attn.mask_to_bias(mask, (B, H, Q + T, DH), Q + T, torch.bfloat16)
    assert bias.shape == (B, H, Q + T, Q + T)
    assert all(stride % 8 == 0 for stride in bias.stride()[:-1]) and bias.stride(-1) == 1
    assert torch.equal(bias == 0, mask.expand(B, H, -1, -1))
    assert torch.isinf(bias[~mask.expand(B, H, -1, -1)]).all()
