"""AdamW over the trainable parameters only, in BLIP-2's two groups, and the warm-up + cosine schedule.

Fine-tuning recipes add groups of their own learning rate (the encoder, per layer under layer
decay; LoRA adapters): each such group carries an `lr_scale`, its peak over optimizer.lr, and the
schedule sets its lr to the scheduled lr times that scale, so every group follows the same curve.

The schedule is a pure function of the optimizer step, so a resumed run needs only the step to be
back on the same curve; it still has a state_dict, like any torch scheduler, for the checkpoint.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from vlbridge.errors import VLBridgeError
from vlbridge.train.config import OptimizerConfig, ScheduleConfig


def parameter_groups(model: nn.Module, weight_decay: float,
                     lr_groups: Mapping[int, tuple[str, float]] | None = None) -> list[dict[str, Any]]:
    """Trainable parameters split as BLIP-2 does: matrices and embeddings decay; biases, norm
    weights, scalars (the ITC temperature) and other tensors of rank < 2 do not. `lr_groups` maps a
    parameter's id to (label, lr scale) for parameters at their own learning rate; they get groups
    `label.decay` / `label.no_decay` after the two base groups, in the model's parameter order."""
    lr_groups = lr_groups or {}
    groups: dict[tuple[str, bool], dict[str, Any]] = {
        ("", True): {"params": [], "weight_decay": weight_decay, "name": "decay"},
        ("", False): {"params": [], "weight_decay": 0.0, "name": "no_decay"},
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # frozen encoder / LLM: never handed to the optimizer
        decays = not (param.ndim < 2 or name.endswith(".bias"))
        label, scale = lr_groups.get(id(param), ("", 1.0))
        group = groups.get((label, decays))
        if group is None:
            group = groups[(label, decays)] = {"params": [], "weight_decay": weight_decay if decays else 0.0,
                                               "name": f"{label}.{'decay' if decays else 'no_decay'}", "lr_scale": scale}
        group["params"].append(param)
    return list(groups.values())


def prefix_lr_groups(model: nn.Module, scales: Mapping[str, float]) -> dict[int, tuple[str, float]]:
    """`optimizer.lr_scales` as parameter-id groups: each trainable parameter under a prefix (at a dot
    boundary) gets the longest such prefix's scale. A prefix that matches nothing is a typo: an error."""
    trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    groups: dict[int, tuple[str, float]] = {}
    for prefix in sorted(scales, key=len):  # longer prefixes later, so they win
        matched = [param for name, param in trainable if name == prefix or name.startswith(prefix + ".")]
        if not matched:
            tops = sorted({".".join(name.split(".")[:2]) for name, _ in trainable})
            raise VLBridgeError(f"optimizer.lr_scales: {prefix!r} names no trainable parameter of this stage; "
                                f"trainable ones start with {tops}")
        groups.update({id(param): (prefix, scales[prefix]) for param in matched})
    return groups


def build_optimizer(model: nn.Module, config: OptimizerConfig,
                    lr_groups: Mapping[int, tuple[str, float]] | None = None) -> torch.optim.AdamW:
    """AdamW over `model`'s trainable parameters; empty groups are dropped (a connector of only matrices).
    `lr_groups` (fine-tuning recipes) win over `config.lr_scales` for the parameters they name."""
    lr_groups = {**prefix_lr_groups(model, config.lr_scales), **(lr_groups or {})}
    groups = [g for g in parameter_groups(model, config.weight_decay, lr_groups) if g["params"]]
    if not groups:
        raise VLBridgeError("the model has no trainable parameters; check the stage and the connector")
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """Load a checkpoint's optimizer state (the moments and step counts) but keep the settings of
    the config the run resumes with: torch's load_state_dict would put back the saved groups'
    weight_decay, betas, eps and lr_scale, silently undoing a changed `optimizer:` section that the
    resume reports as changed (lr is set by the schedule, from the config, either way)."""
    saved = [(group.get("name"), len(group["params"])) for group in state["param_groups"]]
    now = [(group.get("name"), len(group["params"])) for group in optimizer.param_groups]
    if saved != now:  # torch pairs groups by position: moments would land on other parameters, or it fails bare
        raise VLBridgeError(f"cannot resume the optimizer state: the checkpoint's parameter groups {_groups(saved)} differ "
                            f"from this config's {_groups(now)}; optimizer.lr_scales may change its scales on a resume, "
                            "not which prefixes it names (use the checkpoint's prefixes, or start a new run in another output_dir)")
    settings = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, configured in zip(optimizer.param_groups, settings):
        group.update(configured)


def _groups(layout: list[tuple[Any, int]]) -> str:
    return "[" + ", ".join(f"{name} ({count} tensors)" for name, count in layout) + "]"


class WarmupCosine:
    """Sets every group's lr each step: linear from `warmup_lr` to `lr` over `warmup_steps`, then a
    cosine from `lr` down to `min_lr` at `total_steps` (held there beyond), times the group's
    `lr_scale` where it has one. Step s is the s-th update."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, lr: float, total_steps: int, schedule: ScheduleConfig):
        self.optimizer, self.peak, self.total = optimizer, lr, total_steps
        self.warmup, self.warmup_lr, self.min_lr = schedule.warmup_steps, schedule.warmup_lr, schedule.min_lr
        self.step_count = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        """The learning rate of update number `step` (0-based)."""
        if step < self.warmup:
            return self.warmup_lr + (self.peak - self.warmup_lr) * (step + 1) / self.warmup
        decay_steps = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / decay_steps)
        return self.min_lr + (self.peak - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    @property
    def lr(self) -> float:
        return self.lr_at(self.step_count)

    def step(self) -> None:
        """Move to the next update's learning rate (call after each optimizer step, taken or skipped)."""
        self.step_count += 1
        self._apply()

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * group.get("lr_scale", 1.0)

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "peak": self.peak, "total": self.total,
                "warmup": self.warmup, "warmup_lr": self.warmup_lr, "min_lr": self.min_lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position only: the curve comes from the (possibly extended) config."""
        self.step_count = int(state["step_count"])
        self._apply()
