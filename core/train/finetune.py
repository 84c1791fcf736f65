"""Applying a training config's `finetune:` section to a built model, and what each recipe trains.

`apply_finetune` runs after the model is built (and init_from restored) and before the optimizer:
it unfreezes the encoder (all of it or its last blocks, cast to fp32: AdamW on half-precision
weights loses small updates, and LAVIS fine-tunes its ViT in fp32 too), turns on gradient
checkpointing, and injects LoRA adapters into the LLM (or trains those init_from brought). It
returns the learning-rate multipliers of those parameters for the optimizer's groups. The counts
are taken from the built model (LoRA's size depends on the LLM's layer shapes), and printed by the
trainer's start line and by `vlbridge validate --train CONFIG.yaml`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vlbridge.plugin.contract import describe
from vlbridge.finetune.encoder_tuning import enable_grad_checkpointing, unfreeze_encoder
from vlbridge.errors import VLBridgeError
from vlbridge.finetune.lora import add_lora, lora_parameters, resolve_settings
from vlbridge.train.finetune_config import FinetuneConfig
from vlbridge.finetune.tuning import dtype_name

HALF = (torch.float16, torch.bfloat16)


@dataclass
class Recipe:
    """What apply_finetune set up: lr multipliers by parameter id, and words for the start line."""

    lr_groups: dict[int, tuple[str, float]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # "encoder" / "lora" -> what trains


def apply_finetune(model: Any, finetune: FinetuneConfig, base_lr: float) -> Recipe:
    """Make the model train what `finetune` asks besides the connector (see the module docstring)."""
    recipe = Recipe()
    if finetune.encoder.trains:
        _tune_encoder(model, finetune, base_lr, recipe)
    if finetune.lora is not None:
        _tune_llm(model, finetune, base_lr, recipe)
    return recipe


def _tune_encoder(model: Any, finetune: FinetuneConfig, base_lr: float, recipe: Recipe) -> None:
    options = finetune.encoder
    who = describe(model.plan.encoder)
    unfrozen = unfreeze_encoder(model.encoder, options.unfreeze, who=who,
                                need_blocks=options.layer_decay != 1 or options.grad_checkpointing)
    if any(param.dtype in HALF for param in model.encoder.parameters()):
        model.encoder.float()
    if options.grad_checkpointing:
        enable_grad_checkpointing(unfrozen.blocks)
    model.tuned.encoder_names |= set(unfrozen.names)
    model.tuned.encoder_dtype = dtype_name(next(model.encoder.parameters()).dtype)
    params = dict(model.encoder.named_parameters())
    peak = (options.lr or base_lr) / base_lr
    for name in unfrozen.names:
        label = f"encoder.layer{unfrozen.layers[name]}" if options.layer_decay != 1 else "encoder"
        recipe.lr_groups[id(params[name])] = (label, peak * unfrozen.lr_scale(name, options.layer_decay))
    recipe.notes["encoder"] = options.describe(unfrozen.depth)


def _tune_llm(model: Any, finetune: FinetuneConfig, base_lr: float, recipe: Recipe) -> None:
    options = finetune.lora
    assert options is not None
    if model.llm is None:
        raise VLBridgeError("finetune.lora: the model has no LLM (stage 1); LoRA needs stage 2")
    if not isinstance(getattr(model.llm, "model", None), torch.nn.Module):
        raise VLBridgeError(f"finetune.lora: {describe(model.plan.llm)} does not hold its transformers model as `.model` "
                            "(as the built-in LLM wrappers do), so peft has nothing to put adapters on")
    settings = {"r": options.r, "alpha": options.alpha, "dropout": options.dropout, "target_modules": options.target_modules}
    if model.tuned.lora is None:
        model.tuned.lora = add_lora(model.llm, settings)
    else:  # init_from brought adapters: train those, if they are the ones asked for
        asked = resolve_settings(model.llm.model, settings)
        if asked != model.tuned.lora:
            raise VLBridgeError(f"finetune.lora: init_from holds LoRA adapters {model.tuned.lora}, but the config asks for {asked}; "
                                "give the same r, alpha, dropout and target_modules to train them on, or start from a checkpoint without them")
        for param in lora_parameters(model.llm.model).values():
            param.requires_grad_(True)
    peak = (options.lr or base_lr) / base_lr
    for param in lora_parameters(model.llm.model).values():
        recipe.lr_groups[id(param)] = ("lora", peak)
    targets = model.tuned.lora["target_modules"]
    recipe.notes["lora"] = f"r {options.r} on {targets if isinstance(targets, str) else ', '.join(targets)}"


def trainable_counts(model: Any) -> dict[str, int]:
    """Trainable parameters per part: connector, encoder (its unfrozen part), LoRA (the adapters)."""
    def count(params: Any) -> int:
        return sum(p.numel() for p in params if p.requires_grad)

    lora = count(lora_parameters(model.llm.model).values()) if model.llm is not None and hasattr(model.llm, "model") else 0
    return {"connector": count(model.connector.parameters()), "encoder": count(model.encoder.parameters()), "lora": lora}


def describe_trainable(model: Any, notes: dict[str, str] | None = None) -> str:
    """'connector 1,234 + encoder 5,678 (all of it) + LoRA 910 (r 8 on q_proj, v_proj) = 7,822 trainable parameters'."""
    counts, notes = trainable_counts(model), notes or {}
    parts = [f"connector {counts['connector']:,}"]
    for key, label in (("encoder", "encoder"), ("lora", "LoRA")):
        if counts[key] or key in notes:
            parts.append(f"{label} {counts[key]:,}" + (f" ({notes[key]})" if key in notes else ""))
    total = sum(counts.values())
    return f"{' + '.join(parts)} = {total:,} trainable parameters" if len(parts) > 1 else f"{total:,} trainable parameters (connector)"
