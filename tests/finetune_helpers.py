"""Helpers for the fine-tuning tests (no tests here): run the trainer in-process keeping its model,
and snapshot / compare tensors by part."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from tests.test_trainer_samples import config
from vlbridge.train import runtime as rt
from vlbridge.train.config import check_config, read_config
from vlbridge.train.trainer import Trainer, TrainResult

ENCODER_ALL = {"encoder": {"unfreeze": "all"}}
ENCODER_LAST = {"encoder": {"unfreeze": 1, "layer_decay": 0.5, "lr": 2e-3, "grad_checkpointing": True}}
LORA = {"lora": {"r": 4, "alpha": 8, "dropout": 0.1, "lr": 3e-3}}


def stage2(data: Path, out: Path, finetune: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """A short stage-2 run of tiny-qformer-opt with the given finetune section."""
    values = {"stage": 2, "steps": 6, "log_every": 1, "schedule": {"warmup_steps": 0}, "finetune": dict(finetune)}
    return config(data, out, **{**values, **overrides})


def run_trainer(values: Mapping[str, Any], resume: bool = False) -> tuple[Trainer, dict[str, torch.Tensor], TrainResult]:
    """Train in-process; returns the trainer (its model), the model's tensors before training, the result."""
    cfg, label = read_config(dict(values))
    assembly = check_config(cfg, label)
    with rt.runtime(cfg.device) as where:
        trainer = Trainer(cfg, assembly, where)
        before = snapshot(trainer.model)
        try:
            result = trainer.fit(resume)
        finally:
            trainer.close()
    return trainer, before, result


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def changed(model: torch.nn.Module, before: Mapping[str, torch.Tensor]) -> set[str]:
    """Names of the parameters whose values moved since `before`."""
    return {name for name, param in model.named_parameters() if not torch.equal(param.detach(), before[name])}


def is_lora(name: str) -> bool:
    return ".lora_" in name


def fixed_batch(model: Any, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixels and a tokenized caption batch for comparing logits."""
    size = model.plan.preprocess.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    ids, mask = model.llm.tokenize(["a red square", "a blue square on a table"])
    return pixels, ids, mask


def logits(model: Any, seed: int = 3) -> torch.Tensor:
    pixels, ids, mask = fixed_batch(model, seed)
    extra = {"labels": ids} if model.llm.is_encoder_decoder else {}  # T5's decoder reads the caption
    with torch.no_grad():
        return model(pixels, ids, mask, **extra).logits
