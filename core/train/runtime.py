"""Where a run executes: the device, the process group under torchrun, seeds, mixed precision, and
the DDP wrapper around the model and its objective.

One process is the default; under `torchrun --nproc_per_node N` the environment says how many there
are, and the same code runs DDP (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vlbridge.parts.devices import resolve_device
from vlbridge.errors import VLBridgeError
from vlbridge.train import distributed

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    """This process's place in the run."""

    device: torch.device
    rank: int
    world_size: int

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, metrics and the progress bar."""
        return self.rank == 0


@contextlib.contextmanager
def runtime(device_setting: str) -> Iterator[Runtime]:
    """Join the process group torchrun describes (if any) for the length of the run."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_setting, local_rank=local_rank, option="device")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    started = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not distributed.is_distributed():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        started = True
    try:
        yield Runtime(device, distributed.rank(), distributed.world_size())
    finally:
        if started:
            dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """python, numpy and torch (every device) from one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device, precision: str) -> ContextManager[Any]:
    """The forward pass's autocast for bf16 / fp16; nothing for fp32."""
    if precision not in AUTOCAST_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


def isolated_rng(device: torch.device) -> ContextManager[Any]:
    """Run something (evaluation) without moving the training run's torch generators."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices, device_type="cuda" if device.type == "cuda" else "cpu")


class ObjectiveStep(nn.Module):
    """The model and its objective as one module, so that DDP wraps the objective's forward pass
    (the objective calls several connector methods, not just `forward`)."""

    def __init__(self, model: nn.Module, objective: Callable[[nn.Module, Mapping[str, Any]], dict[str, torch.Tensor]]):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return self.objective(self.model, batch)


def wrap(model: nn.Module, objective: Any, run: Runtime, find_unused_parameters: bool, ddp: bool = True) -> nn.Module:
    """ObjectiveStep, in DDP when there are several processes (and `ddp`; FSDP runs average their
    gradients themselves). DDP is told to ignore the frozen
    encoder and LLM and every buffer: no start-up broadcast of billions of frozen weights, no
    gradient buckets for them, no buffer sync each step (every rank builds the frozen parts alike)."""
    step = ObjectiveStep(model, objective)
    if run.world_size == 1 or not ddp:
        return step
    frozen = [f"model.{name}" for name, p in model.named_parameters() if not p.requires_grad]
    frozen += [f"model.{name}" for name, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step, frozen)
    device_ids = [run.device.index] if run.device.type == "cuda" else None
    return DistributedDataParallel(step, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def no_sync(step: nn.Module, sync: bool) -> ContextManager[Any]:
    """DDP's no_sync for the micro-batches before the last of an accumulation (no all-reduce)."""
    if sync or not isinstance(step, DistributedDataParallel):
        return contextlib.nullcontext()
    return step.no_sync()


def all_finite(flag: torch.Tensor) -> bool:
    """True when every rank's flag is 1: a non-finite loss anywhere skips the step everywhere."""
    if distributed.is_distributed():
        flag = flag.clone()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each key summed over the ranks (plain floats; once per log or evaluation, so cheap)."""
    total: dict[str, float] = {}
    for part in distributed.all_gather_object(values):
        for key, value in part.items():
            total[key] = total.get(key, 0.0) + value
    return total


def sum_tensor_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor summed over the ranks (itself in one process)."""
    if not distributed.is_distributed():
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if distributed.is_distributed():
        dist.barrier()


def require_single_or_same(saved_world: int, run: Runtime) -> None:
    """A checkpoint's data positions and RNG states are per rank: resume with as many processes."""
    if saved_world != run.world_size:
        raise VLBridgeError(f"the checkpoint was written by {saved_world} process(es) but this run has {run.world_size}; "
                            f"resume with the same number (torchrun --nproc_per_node {saved_world})")
