"""An experiment for issue 21, not a vlbridge feature: route `torch.nn.functional.linear` through
oneDNN's inner-product kernels (`torch.ops.mkldnn._linear_pointwise`, the private op inductor's CPU
freezing uses) instead of torch's default fp32 GEMM (MKL's sgemm).

On an AMD CPU, MKL's sgemm runs its AVX2 kernels even where the CPU has AVX-512, and oneDNN's
own kernels are up to 2.4x faster (`bench/probe_cpu_gemm.py`). Their sums are ordered differently,
so outputs differ from transformers' in the last bits: a bench that must keep captions identical
can only report this as a separate row."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def install(packed: bool) -> None:
    """Replace F.linear in this process for fp32 CPU calls without autograd. `packed`: each weight is
    reordered once into oneDNN's blocked layout (a second copy of it, sized for the rows of its first
    call), as inductor's freezing does; otherwise oneDNN reads the plain weight at every call."""
    if not available():
        raise SystemExit("this torch has no oneDNN (mkldnn) linear op, so --ours-linear onednn cannot run")
    plain = F.linear
    reordered: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(weight) -> (weight, its blocked copy)

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or torch.is_grad_enabled():
            return plain(x, weight, bias)
        if packed:
            kept = reordered.get(id(weight))
            if kept is None or kept[0] is not weight:
                rows = x.numel() // x.shape[-1]
                kept = reordered[id(weight)] = (weight, torch.ops.mkldnn._reorder_linear_weight(weight, rows))
            weight = kept[1]
        return pointwise(x, weight, bias)

    F.linear = linear
