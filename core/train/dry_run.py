"""`vlbridge train --check`'s second half: build the model as training would, on torch's meta device,
and run the checks that need built modules, before any weight is read or allocated.

The config checks (vlbridge.train.config) see options and declarations only. Mistakes in what the
parts really are surfaced only after a real run had loaded every weight and started reading data:
a plugin whose factory raises, a connector whose tokens do not have the LLM's width, LoRA target
modules the LLM lacks, more encoder blocks to unfreeze than it runs, an optimizer.lr_scales prefix
that names no trainable parameter, init_from tensors of other shapes, a parallel setting with
nothing to act on. (`vlbridge validate --train` builds the real model, weights and all, and runs
the same recipe checks on it: recipe_problems.) Here each part is built under `torch.device("meta")` (shapes without storage,
so a 7B LLM costs no memory) and the trainer's own steps run on it: build_model's parts,
check_real_shapes, load_connector_weights / restore_tuned from the safetensors headers,
apply_finetune, build_optimizer, and the FSDP block discovery.

A part whose spec declares that it reads weights (a local file or a hub model) is not built: its
factory would read them, meta device or not. It is said so in the output, and the checks that need
its modules are left to the run. A frozen part (encoder, LLM) whose spec declares no weight_sources
cannot say whether it reads any, so it is not built either; a connector is built from its options
(one that reads weights, e.g. a Q-Former started from a BERT checkpoint, leaves nothing to build).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from vlbridge.assemblies.assembly import Assembly
from vlbridge.assemblies.reachability import sources
from vlbridge.errors import VLBridgeError
from vlbridge.files.checkpoint import read_meta
from vlbridge.files.checkpoint_source import resolve_checkpoint
from vlbridge.modeling import factory
from vlbridge.modeling.model import VLBridgeModel
from vlbridge.plugin.contract import build_component, check_llm, describe
from vlbridge.train.config import TrainConfig, TrainConfigError

if TYPE_CHECKING:
    from vlbridge.train.finetune import Recipe


class NotBuilt(nn.Module):
    """Stands in for a part --check does not build (it would read weights): no parameters, no forward."""


def check_built(config: TrainConfig, assembly: Assembly, label: str) -> list[str]:
    """Build on the meta device and run the checks; the notes to print, or TrainConfigError."""
    skipped = unbuilt_parts(assembly, config.stage)
    if "connector" in skipped:  # every module check goes through the connector
        return [f"not built: {skipped['connector']}, so --check builds no part; the checks that need built modules "
                "run when training starts"]
    try:
        model = build_on_meta(assembly, config.stage, skipped, config.seed)
    except VLBridgeError as exc:
        if needs_real_tensors(exc):  # a factory that reads values (.item(), a copy) builds for real, not on meta
            return [f"not built: {exc}; it needs real tensors to build, which --check does not make, so the checks "
                    "that need built modules run when training starts"]
        raise TrainConfigError(label, [f"assembly: building the model failed: {exc}"]) from None
    problems = [*shape_problems(model, skipped), *init_from_problems(model, config, skipped)]
    problems.extend(training_problems(model, config, skipped))
    if problems:
        raise TrainConfigError(label, problems)
    built = [slot for slot in model_slots(config.stage, assembly) if slot not in skipped]
    notes = [f"built on the meta device (no weights read or allocated): {', '.join(built)}"]
    notes.extend(f"not built: {reason}; the checks that need its modules run when training starts" for reason in skipped.values())
    return notes


def needs_real_tensors(exc: BaseException) -> bool:
    """Whether a build failed only because its tensors were on the meta device (a plugin factory that
    reads a value, e.g. `.item()` or a copy to numpy), as torch words that: such a part builds for
    real and trains; any other failure is the error training would meet."""
    while exc is not None:
        if "meta tensor" in str(exc) or "meta device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def model_slots(stage: int, assembly: Assembly) -> list[str]:
    return ["encoder", "connector", *(["llm"] if stage == 2 and assembly.llm is not None else [])]


def unbuilt_parts(assembly: Assembly, stage: int) -> dict[str, str]:
    """Slot -> why --check leaves it unbuilt: its factory reads weights (a tokenizer is small and
    read), or it is a frozen part that does not say what it reads."""
    skipped: dict[str, str] = {}
    for item in sources(assembly, stage):
        if item.source.kind != "random" and item.source.what == "weights":
            skipped.setdefault(item.slot, f"{item.slot} {item.component!r} reads its weights from {item.source.value}")
    for slot in model_slots(stage, assembly):
        part = getattr(assembly, slot)
        if slot != "connector" and part.spec.weight_sources is None:
            skipped.setdefault(slot, f"{describe(part.spec)} declares no weight_sources, so --check cannot tell whether it "
                                     "reads weights")
    return skipped


def build_on_meta(assembly: Assembly, stage: int, skipped: dict[str, str], seed: int) -> VLBridgeModel:
    """The stage's model as vlbridge.build makes it (the same factories, seeds and declared-width
    checks), every tensor on the meta device; skipped parts are NotBuilt stand-ins."""
    plan = assembly.plan
    llm_width = plan.llm_dims.embed_width if plan.llm_dims is not None else 0
    with torch.device("meta"):
        encoder = NotBuilt() if "encoder" in skipped else factory._build_frozen(assembly.encoder)
        connector = factory.seeded(seed, build_component, assembly.connector.spec, assembly.connector.options,
                                   plan.encoder_out, llm_width)
        llm = None
        if stage == 2 and assembly.llm is not None:
            llm = NotBuilt() if "llm" in skipped else factory._build_frozen(assembly.llm)
    if llm is not None and "llm" not in skipped:
        check_llm(llm, plan.llm_dims, describe(plan.llm))
    return VLBridgeModel(assembly, encoder, connector, llm, stage)


def shape_problems(model: VLBridgeModel, skipped: dict[str, str]) -> list[str]:
    """The encoder's tokens (when built) and the connector's visual tokens against the plan: their
    width is the LLM's embedding width. Without the encoder, tokens of its declared shape go in."""
    plan = model.plan
    try:
        if "encoder" in skipped:
            image_embeds = torch.zeros(1, plan.encoder_out.num_tokens, plan.encoder_out.width, device="meta")
        else:
            image_embeds = factory.check_encoder_tokens(model)
        factory.check_connector_tokens(model, image_embeds)
    except VLBridgeError as exc:
        return [f"assembly: {exc}"]
    return []


def init_from_problems(model: VLBridgeModel, config: TrainConfig, skipped: dict[str, str]) -> list[str]:
    """init_from's tensors against the built connector (and the encoder tensors and adapters its run
    fine-tuned), their shapes read from the safetensors headers."""
    if config.init_from is None:
        return []
    from vlbridge.finetune.tuning import restore_tuned

    try:
        directory = resolve_checkpoint(config.init_from, "init_from").directory
        factory.load_connector_weights(model, directory, shapes_only=True)
        meta = read_meta(directory)
        needs = [slot for slot, key in (("encoder", "encoder"), ("llm", "lora")) if meta.get(key) and slot in skipped]
        if not needs:
            restore_tuned(model, Path(directory), meta, shapes_only=True)
    except VLBridgeError as exc:
        text = str(exc)
        return [text if text.startswith("init_from") else f"init_from: {text}"]
    return []


def training_problems(model: VLBridgeModel, config: TrainConfig, skipped: dict[str, str]) -> list[str]:
    """The fine-tuning recipes, the optimizer's groups (lr_scales) and the parallel settings, applied
    to the meta model as the trainer applies them to the real one."""
    from vlbridge.train.finetune import apply_finetune

    asks = [("encoder", config.finetune.encoder.trains), ("llm", config.finetune.lora is not None)]
    unchecked = [slot for slot, asked in asks if asked and slot in skipped]
    if unchecked:
        return []  # what trains depends on a part that is not built: lr_scales and shards cannot be judged either
    try:
        recipe = apply_finetune(model, config.finetune, config.optimizer.lr)
    except VLBridgeError as exc:
        return [str(exc)]
    return recipe_problems(model, config, recipe, skipped)


def recipe_problems(model: VLBridgeModel, config: TrainConfig, recipe: Recipe, skipped: dict[str, str]) -> list[str]:
    """The optimizer's groups (lr_scales) and the parallel settings of a model with its recipes applied
    (on the meta device here; `validate --train` runs the same on its real build)."""
    from vlbridge.train.optim import build_optimizer

    problems = parallel_module_problems(model, config, skipped)
    try:
        build_optimizer(model, config.optimizer, recipe.lr_groups)
    except VLBridgeError as exc:
        problems.insert(0, str(exc))
    return problems


def parallel_module_problems(model: VLBridgeModel, config: TrainConfig, skipped: dict[str, str]) -> list[str]:
    """Parallel settings with nothing to act on: LLM blocks to checkpoint that it does not list, or a
    part to shard of which everything trains (FSDP leaves trainable tensors whole)."""
    from vlbridge.train.fsdp import require_frozen_to_shard, require_llm_blocks

    checks = [require_llm_blocks] if config.parallel.activation_checkpointing and "llm" not in skipped else []
    checks += [lambda m, name=name: require_frozen_to_shard(m, name) for name in config.parallel.parts(config.stage)
               if name not in skipped]
    problems = []
    for check in checks:  # the checks training makes when it applies the parallel settings (fsdp.apply_parallel)
        try:
            check(model)
        except VLBridgeError as exc:
            problems.append(str(exc))
    return problems
