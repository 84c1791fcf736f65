"""Collectives for training that fall back to the identity in a single process.

Every helper checks for an initialised process group and otherwise behaves as world size 1, so the
objectives and their tests run unchanged without `torch.distributed` (LAVIS calls `dist.get_rank()`
unguarded and fails on one GPU, LAVIS #537). torch is imported inside the functions, so importing
this module stays torch-free.

Gathers concatenate along dim 0 in rank order. Ranks may hold different batch sizes (a short last
batch): the sizes are exchanged first and every tensor is padded to the largest for the collective,
then cut back; all other dims must agree across ranks. Every rank must call each gather (and, for
`all_gather_with_grad`, backpropagate through it) the same number of times, as in any SPMD loop.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def is_distributed() -> bool:
    """True when a torch.distributed process group is initialised (more than a plain process)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank; 0 without a process group."""
    import torch.distributed as dist

    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes; 1 without a process group."""
    import torch.distributed as dist

    return dist.get_world_size() if is_distributed() else 1


def all_gather_object(obj: Any) -> list[Any]:
    """One picklable object from every rank, in rank order; `[obj]` in a single process."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_gather_no_grad(tensor: "torch.Tensor", keep_local: bool = False) -> "torch.Tensor":
    """(n_r, ...) on each rank -> (sum n_r, ...), detached (BLIP's `concat_all_gather`).

    `keep_local=True` puts this rank's own rows back as the input tensor itself, so gradients still
    flow into the local rows while the other ranks' rows stay constants. In a single process that is
    the input unchanged; otherwise the result is always detached (also in a single process).
    """
    if not is_distributed():
        return tensor if keep_local else tensor.detach()
    import torch

    with torch.no_grad():
        gathered, sizes = _gather(tensor.detach())
    if not keep_local:
        return gathered
    start = sum(sizes[: rank()])
    return torch.cat([gathered[:start], tensor, gathered[start + tensor.shape[0]:]])


def max_over_ranks(value: int, device: "torch.device") -> int:
    """The largest of every rank's `value` (a width to pad to before a gather); `value` in one process.
    `device`: where the collective runs (the tensors' device: CPU for gloo, the rank's GPU for nccl)."""
    return max(_gather_sizes(value, device)) if is_distributed() else value


def all_gather_with_grad(tensor: "torch.Tensor") -> "torch.Tensor":
    """(n_r, ...) on each rank -> (sum n_r, ...) that backpropagates to every rank.

    The backward all-reduces (sums) the gradient of the gathered tensor over the ranks and returns
    this rank's rows, so each sample's gradient collects every rank's use of it (BLIP's GatherLayer).
    The input unchanged in a single process.
    """
    if not is_distributed():
        return tensor
    return _gather_with_grad_function().apply(tensor)


def _gather(tensor: "torch.Tensor") -> "tuple[torch.Tensor, list[int]]":
    """All ranks' rows concatenated, and how many rows each rank gave (pads to the largest for the collective)."""
    import torch
    import torch.distributed as dist

    sizes = _gather_sizes(tensor.shape[0], tensor.device)
    was_bool = tensor.dtype == torch.bool  # gloo cannot gather bool tensors
    local = tensor.to(torch.uint8) if was_bool else tensor
    pad = max(sizes) - local.shape[0]
    if pad:
        local = torch.cat([local, local.new_zeros((pad, *local.shape[1:]))])
    parts = [torch.empty_like(local) for _ in sizes]
    dist.all_gather(parts, local.contiguous())
    gathered = torch.cat([part[:n] for part, n in zip(parts, sizes)])
    return (gathered.bool() if was_bool else gathered), sizes


def _gather_sizes(rows: int, device: "torch.device") -> list[int]:
    import torch
    import torch.distributed as dist

    mine = torch.tensor([rows], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(mine) for _ in range(world_size())]
    dist.all_gather(sizes, mine)
    return [int(size.item()) for size in sizes]


@functools.cache
def _gather_with_grad_function() -> type:
    """The autograd Function, defined on first use so that importing this module needs no torch."""
    import torch
    import torch.distributed as dist

    class GatherWithGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
            gathered, sizes = _gather(tensor)
            ctx.rows = slice(sum(sizes[: rank()]), sum(sizes[: rank() + 1]))
            return gathered

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            total = grad.contiguous().clone()
            dist.all_reduce(total)  # sum over ranks: every rank's loss used these rows
            return total[ctx.rows]

    return GatherWithGrad
