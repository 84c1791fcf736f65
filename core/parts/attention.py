"""The one attention entry point of vlbridge, with three interchangeable backends.

Every attention in vlbridge's own modules calls `attention(q, k, v, mask)` so that the kernel is
chosen in one place: xformers' memory-efficient kernels on CUDA when they can run, torch's
`scaled_dot_product_attention` otherwise, and a plain-math `eager` path that is the reference the
others are tested against. `VLBRIDGE_ATTENTION=xformers|sdpa|eager` or `set_attention_backend(name)`
forces one; a forced backend that cannot run is an error, never a silent fallback.
"""

from __future__ import annotations

import functools
import math
import os
from types import ModuleType

import torch
import torch.nn.functional as F

from vlbridge.parts.dropout import dropout
from vlbridge.errors import VLBridgeError

BACKENDS: tuple[str, ...] = ("xformers", "sdpa", "eager")
ENV_VAR = "VLBRIDGE_ATTENTION"
_HALF = (torch.float16, torch.bfloat16)
_XFORMERS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_forced: str | None = None  # set by set_attention_backend; wins over the environment variable


def _check_name(name: str, source: str) -> str:
    value = name.strip().lower()
    if value not in BACKENDS:
        raise VLBridgeError(f"unknown attention backend {name!r} ({source}); choose one of {', '.join(BACKENDS)}")
    return value


def set_attention_backend(name: str | None) -> None:
    """Force a backend for every later call (None: back to VLBRIDGE_ATTENTION, else automatic).

    Forcing xformers where it cannot run at all (no CUDA, not installed) fails here, at once.
    """
    global _forced
    if name is None:
        _forced = None
        return
    value = _check_name(name, "set_attention_backend")
    if value == "xformers":
        reason = _xformers_unavailable()
        if reason:
            raise VLBridgeError(f"cannot force attention backend 'xformers': {reason}; use 'sdpa' or 'eager'")
    _forced = value


def forced_backend() -> str | None:
    """The backend forced by set_attention_backend or VLBRIDGE_ATTENTION; None means automatic."""
    if _forced is not None:
        return _forced
    env = os.environ.get(ENV_VAR, "").strip()
    if not env or env.lower() == "auto":
        return None
    return _check_name(env, f"environment variable {ENV_VAR}")


@functools.lru_cache(maxsize=1)
def _import_xformers() -> tuple[ModuleType | None, str]:
    """xformers.ops, imported once and only when CUDA is present (its import warns without it)."""
    try:
        import xformers.ops as xops
    except Exception as exc:  # ImportError, or a broken build failing at import
        return None, f"xformers cannot be imported ({type(exc).__name__}: {exc}); pip install xformers"
    return xops, ""


def _xformers_unavailable() -> str:
    """Why xformers cannot run on this machine at all ('' if it can)."""
    if not torch.cuda.is_available():
        return "xformers kernels run on CUDA only and no CUDA device is available"
    return _import_xformers()[1]


def _xformers_unusable(device: torch.device, dtype: torch.dtype, head_dims: tuple[int, ...]) -> str:
    """Why xformers cannot run these tensors ('' if it can): device, dtype and alignment rules."""
    if device.type != "cuda":
        return f"the tensors are on {device.type}; xformers kernels run on CUDA only"
    reason = _xformers_unavailable()
    if reason:
        return reason
    if dtype not in _XFORMERS_DTYPES:
        return f"dtype {dtype} is not supported (fp16, bf16 or fp32)"
    align = 8 if dtype in _HALF else 4
    if any(d % align for d in head_dims):
        return f"head dims {head_dims} must be multiples of {align} for {dtype}"
    return ""


def which_backend(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    head_dims: tuple[int, ...] = (64,),
    *,
    backend: str | None = None,
) -> str:
    """The backend `attention` would run for tensors of this device, dtype and head dims.

    Order: the `backend` argument, then set_attention_backend, then VLBRIDGE_ATTENTION, then
    automatic (xformers where it can run, else sdpa). Raises VLBridgeError if a forced xformers
    cannot run these tensors.
    """
    name = _check_name(backend, "backend argument") if backend is not None else forced_backend()
    if name not in (None, "xformers"):
        return name
    reason = _xformers_unusable(torch.device(device), dtype, head_dims)
    if name == "xformers" and reason:
        raise VLBridgeError(f"attention backend 'xformers' was forced but cannot run here: {reason}; "
                            f"unset {ENV_VAR} / call set_attention_backend(None), or choose 'sdpa' or 'eager'")
    return "sdpa" if reason else "xformers"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v over (B, H, L, Dh) tensors; returns (B, H, Lq, Dv).

    `mask` is boolean, broadcastable to (B, H, Lq, Lk), True where a query may attend to a key.
    Every query row should see at least one key (a row that sees none gives zeros on eager and
    sdpa, NaN on xformers). `dropout_p` applies to the attention probabilities; 0.0 in eval mode.
    """
    if mask is not None and mask.dtype != torch.bool:
        raise VLBridgeError(f"attention mask must be boolean (True = may attend), got {mask.dtype}")
    name = which_backend(q.device, q.dtype, (q.shape[-1], v.shape[-1]), backend=backend)
    if name == "sdpa" and dropout_p > 0.0 and q.device.type == "cpu":
        # torch has no fused CPU kernel with dropout: it would run its own math path with its
        # Bernoulli masks. Ours is the same math with masks three times cheaper (vlbridge.parts.dropout).
        name = "eager"
    if name == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if name == "xformers":
        return _xformers_attention(q, k, v, mask, dropout_p)
    return _eager_attention(q, k, v, mask, dropout_p)


def _eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    """The reference: explicit scores, softmax in fp32, fully masked rows set to zero like SDPA.

    On CPU it is also the training path (attention dropout), where each pass over the (B, H, Lq, Lk)
    scores counts: the scale goes onto q (Lk / Dh times smaller; exact for power-of-two head dims),
    the mask fills the fresh scores in place, and rows are zeroed only if some row sees no key.
    """
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)  # (B, H, Lq, Lk)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32)
    if mask is not None and _has_blind_rows(mask):
        probs = probs.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    probs = probs.to(q.dtype)
    if dropout_p > 0.0:
        probs = dropout(probs, dropout_p)
    return probs @ v


def _has_blind_rows(mask: torch.Tensor) -> bool:
    """Whether some query row sees no key (its softmax is NaN and must become zeros). Checked on the
    small boolean mask on CPU; assumed elsewhere, where the check would synchronise."""
    return mask.device.type != "cpu" or not bool(mask.any(dim=-1).all())


def _xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    xops = _import_xformers()[0]
    bias = None if mask is None else mask_to_bias(mask, q.shape, k.shape[-2], q.dtype)
    # xformers wants (B, L, H, Dh); these transposes are views (only the last stride must be 1).
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, p=dropout_p)
    return out.transpose(1, 2)  # (B, Lq, H, Dv) -> (B, H, Lq, Dv)


def mask_to_bias(mask: torch.Tensor, q_shape: torch.Size, k_len: int, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as the additive bias xformers takes: (B, H, Lq, Lk), 0 or -inf.

    xformers requires every stride but the last to be a multiple of 8 (16-bit) or 4 (fp32), so the
    bias is sliced from a buffer whose rows are padded to a multiple of 8, and broadcast over the
    batch and head dims with expand (stride 0) rather than copied.
    """
    batch, heads, q_len, _ = q_shape
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    mb, mh = mask.shape[0], mask.shape[1]
    padded = -(-k_len // 8) * 8
    bias = torch.full((mb, mh, q_len, padded), float("-inf"), dtype=dtype, device=mask.device)[..., :k_len]
    bias.masked_fill_(mask.expand(mb, mh, q_len, k_len), 0.0)
    return bias.expand(batch, heads, q_len, k_len)
