"""FSDP2 for the frozen parts: the LLM and/or encoder split over the ranks block by block.

Why only the frozen parts: they are what does not fit (a 7B LLM next to EVA ViT-g), and they have
no gradients or optimizer state. Everything that trains (connector, LoRA adapters, unfrozen encoder
tensors) is left out of the shards (`ignored_params`) and stays a whole, plain tensor on every rank;
its gradients are averaged over the ranks by `average_gradients` once per optimizer step, as DDP
would. So the optimizer, clipping and checkpoints see exactly what a one-process run sees: an FSDP
checkpoint is a one-process checkpoint, and resuming needs nothing FSDP-specific.

Blocks are found without plugin changes: the part's `finetune_blocks()` or `blocks` ModuleList
(vlbridge.finetune.encoder_tuning), else the transformers model's `_no_split_modules` class names;
a part with neither is sharded whole, with a warning. Each block is sharded first, then the part
itself (the root of its group), so the part's forward gathers what lies outside the blocks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from vlbridge.errors import VLBridgeError
from vlbridge.finetune.encoder_tuning import encoder_blocks
from vlbridge.plugin.contract import describe
from vlbridge.train.config import ParallelConfig

PARAM_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ShardedPart:
    """What `shard_part` did to one part: how many blocks it found and how it found them."""

    name: str
    blocks: int
    found_by: str  # "finetune_blocks", "_no_split_modules" or "whole"


def find_blocks(part: nn.Module) -> tuple[list[nn.Module], str]:
    """The part's repeated blocks in forward order and how they were found; ([], "whole") when none."""
    listed = encoder_blocks(part)
    if listed:
        return listed, "finetune_blocks"
    names: set[str] = set()
    for module in part.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    if names:
        found = [m for m in part.modules() if type(m).__name__ in names and m is not part]
        outermost = [m for m in found if not any(m is not o and _contains(o, m) for o in found)]
        if outermost:
            return outermost, "_no_split_modules"
    return [], "whole"


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """FSDP2's policy for the run's `precision`: gathered weights and compute in bf16/fp16, gradient
    reductions in fp32 (the frozen shards have none; the rule holds for any that do); fp32 casts nothing."""
    if precision not in PARAM_DTYPES:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[precision], reduce_dtype=torch.float32)


def shard_part(name: str, part: nn.Module, *, precision: str, reshard_after_forward: bool,
               checkpoint_blocks: bool = False) -> ShardedPart:
    """Shard `part` in place: each block, then the part. Trainable parameters are left whole."""
    blocks, found_by = find_blocks(part)
    if found_by == "whole":
        warnings.warn(f"fsdp: the {name} ({type(part).__name__}) lists no blocks (no finetune_blocks(), no `blocks` ModuleList, "
                      "no transformers _no_split_modules); it is sharded whole, so every rank gathers all of it at once. "
                      "Define finetune_blocks() on it to shard it block by block", stacklevel=2)
    trained = {p for p in part.parameters() if p.requires_grad}
    policy = mixed_precision(precision)
    if checkpoint_blocks:
        recompute_in_backward(part, blocks)
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, mp_policy=policy,
                    ignored_params={p for p in block.parameters() if p in trained})
    fully_shard(part, reshard_after_forward=reshard_after_forward, mp_policy=policy, ignored_params=trained)
    return ShardedPart(name, len(blocks), found_by)


def shard_model(model: nn.Module, parts: Sequence[str], *, precision: str, reshard_after_forward: bool,
                checkpoint_llm: bool) -> list[ShardedPart]:
    """Shard the model's named frozen parts ("llm", "encoder"); the connector is never sharded."""
    done = []
    for name in parts:
        part = getattr(model, name, None)
        if part is None:
            continue
        done.append(shard_part(name, part, precision=precision, reshard_after_forward=reshard_after_forward,
                               checkpoint_blocks=checkpoint_llm and name == "llm"))
    return done


def apply_parallel(model: nn.Module, parallel: ParallelConfig, *, stage: int, precision: str,
                   world_size: int) -> list[ShardedPart] | None:
    """The config's strategy applied to the model in place: the shards under fsdp with several
    processes (the caller then averages the trainable gradients), None where DDP (or one process)
    runs; activation checkpointing of the LLM's blocks either way."""
    parts = parallel.parts(stage)
    if parallel.activation_checkpointing:
        require_llm_blocks(model)
    for name in parts:
        require_frozen_to_shard(model, name)
    if parts and world_size > 1:
        return shard_model(model, parts, precision=precision, reshard_after_forward=parallel.reshard_after_forward,
                           checkpoint_llm=parallel.activation_checkpointing)
    if parallel.activation_checkpointing:
        checkpoint_llm_blocks(model)
    return None


def require_llm_blocks(model: nn.Module) -> None:
    """parallel.activation_checkpointing recomputes the LLM's blocks: an LLM that lists none would
    recompute nothing and hold every activation, silently; an error naming it instead."""
    llm = getattr(model, "llm", None)
    if llm is not None and not find_blocks(llm)[0]:
        plan = getattr(model, "plan", None)
        who = describe(plan.llm) if plan is not None and getattr(plan, "llm", None) is not None else type(llm).__name__
        raise VLBridgeError(f"parallel.activation_checkpointing: {who} lists no blocks (no finetune_blocks(), no `blocks` "
                            "ModuleList, no transformers _no_split_modules), so nothing would be recomputed; set "
                            "activation_checkpointing: false")


def require_frozen_to_shard(model: nn.Module, name: str) -> None:
    """FSDP shards only frozen tensors (trained ones stay whole on every rank): a part named in
    parallel.shard of which every parameter trains would be sharded not at all, silently."""
    part = getattr(model, name, None)
    params = list(part.parameters()) if part is not None else []
    if params and all(p.requires_grad for p in params):
        raise VLBridgeError(f"parallel.shard: every parameter of the {name} trains (finetune.encoder.unfreeze: all), and FSDP "
                            f"shards only frozen tensors, so it has nothing of the {name} to shard; remove {name} from "
                            "parallel.shard, or unfreeze fewer blocks")


def checkpoint_llm_blocks(model: nn.Module) -> int:
    """Activation checkpointing of the LLM's blocks without sharding (ddp or one process); how many."""
    llm = getattr(model, "llm", None)
    blocks = find_blocks(llm)[0] if llm is not None else []
    if blocks:
        recompute_in_backward(llm, blocks)
    return len(blocks)


def recompute_in_backward(part: nn.Module, blocks: Sequence[nn.Module]) -> None:
    """Checkpoint each block (composable, non-reentrant: it composes with fully_shard) and turn the
    part's KV cache off: a transformers block recomputed in the backward pass would append its keys
    and values to the forward's cache a second time and attend over both copies (transformers turns
    the cache off for its own gradient checkpointing too). Generation passes use_cache itself."""
    for module in part.modules():
        settings = getattr(module, "config", None)
        if getattr(settings, "use_cache", False):
            settings.use_cache = False
    for block in blocks:
        checkpoint(block)


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average the trainable (unsharded) gradients over the ranks in one all-reduce. A parameter
    without a gradient on this rank sends zeros; one without a gradient on every rank keeps None
    (as in one process, where the optimizer then skips it)."""
    params = list(params)
    if not params or not dist.is_initialized():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    present = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device)
    flat = torch.cat([*(g.reshape(-1).float() for g in grads), present])
    dist.all_reduce(flat)
    flat[:-len(params)] /= dist.get_world_size()
    offset = 0
    for param, grad, anywhere in zip(params, grads, flat[-len(params):].tolist()):
        n = grad.numel()
        param.grad = flat[offset:offset + n].view_as(grad).to(grad.dtype) if anywhere else None
        offset += n


def local_bytes(module: nn.Module) -> int:
    """Bytes of parameters this rank holds for `module` (its local shards under FSDP)."""
    total = 0
    for param in module.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        total += local.numel() * local.element_size()
    return total
