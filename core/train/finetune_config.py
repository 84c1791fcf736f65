"""The `finetune:` section of a training config: what trains besides the connector. Imports no torch.

BLIP-2 fine-tunes its ViT together with the Q-Former (captioning, VQA, retrieval) while the LLM
stays frozen; LLaVA / TinyLLaVA put LoRA adapters on the frozen LLM. Both are options of the same
trainer, off by default (the frozen bridge). Every learning rate here is a peak: the schedule's
warm-up and cosine scale every parameter group alike (group lr = scheduled lr x peak / optimizer.lr).
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import ConfigDict, Field, field_validator

from vlbridge.files.config_fields import StrictNumbers

Unfreeze = Union[Literal["none", "all"], int]


class _Section(StrictNumbers):
    model_config = ConfigDict(extra="forbid")


class EncoderTuning(_Section):
    """Train the image encoder (all of it or its last blocks) with the connector; the LLM stays frozen."""

    unfreeze: Unfreeze = Field("none", description=(
        "none (frozen, the default), all (every encoder parameter trains), or N: the last N blocks "
        "(and any encoder parameter after them) train, the rest stays frozen"))
    lr: float | None = Field(None, gt=0, description="peak learning rate of the encoder (null: optimizer.lr)")
    layer_decay: float = Field(1.0, gt=0, le=1, description=(
        "layer-wise lr decay as BEiT/EVA fine-tuning: block i of D gets lr x layer_decay^(D - i), parameters "
        "before the blocks (embeddings) lr x layer_decay^(D + 1), after them lr (1: no decay)"))
    grad_checkpointing: bool = Field(False, description=(
        "recompute each trainable encoder block in the backward pass (torch.utils.checkpoint): less memory, ~30% more compute"))

    @field_validator("unfreeze", mode="before")
    @classmethod
    def _unfreeze_value(cls, value: Any) -> Any:
        if value is None or value is False:
            return "none"
        if value is True:
            return "all"
        if isinstance(value, str) and value.strip().lower() in ("none", "all"):
            return value.strip().lower()
        if isinstance(value, int) and value >= 1:
            return value
        raise ValueError(f"give none, all, or the number of last encoder blocks to train (an integer >= 1), got {value!r}")

    @property
    def trains(self) -> bool:
        return self.unfreeze != "none"

    def describe(self, depth: int | None = None) -> str:
        """What trains, in words ("last 2 of 12 blocks", "all of it"); `depth`: the blocks it runs, if known."""
        if self.unfreeze == "none":
            return "frozen"
        of = f" of {depth}" if depth is not None else ""
        what = "all of it" if self.unfreeze == "all" else f"last {self.unfreeze}{of} block{'s' if self.unfreeze != 1 or depth else ''}"
        extras = [f"lr {self.lr:g}" if self.lr is not None else "",
                  f"layer decay {self.layer_decay:g}" if self.layer_decay != 1 else "",
                  "gradient checkpointing" if self.grad_checkpointing else ""]
        return ", ".join([what, *(e for e in extras if e)])


class LoraTuning(_Section):
    """LoRA adapters on the frozen LLM's Linear layers (through peft); the LLM's own weights stay frozen."""

    r: int = Field(8, ge=1, description="rank of each adapter (LLaVA-1.5's LoRA: 128)")
    alpha: float = Field(16.0, gt=0, description="scaling numerator: the update is (alpha / r) x B A (LLaVA-1.5: 256)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter's input while training")
    target_modules: list[str] | Literal["all-linear"] | None = Field(None, description=(
        "names of the Linear layers to adapt (a module matches when its name ends with one), all-linear, or null: "
        "peft's defaults for the LLM's model type (q_proj, v_proj for OPT, Llama, Qwen2; q, v for T5)"))
    lr: float | None = Field(None, gt=0, description="peak learning rate of the adapters (null: optimizer.lr)")

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, value: Any) -> Any:
        if isinstance(value, list) and (not value or not all(isinstance(v, str) and v for v in value)):
            raise ValueError("give at least one module name (e.g. [q_proj, v_proj]), all-linear, or null for peft's defaults")
        return value

    def describe(self) -> str:
        targets = "peft's defaults" if self.target_modules is None else (
            self.target_modules if isinstance(self.target_modules, str) else ", ".join(self.target_modules))
        lr = f", lr {self.lr:g}" if self.lr is not None else ""
        return f"r {self.r}, alpha {self.alpha:g}, dropout {self.dropout:g} on {targets}{lr}"


class FinetuneConfig(_Section):
    """Fine-tuning recipes beyond the frozen bridge (all off by default)."""

    encoder: EncoderTuning = Field(default_factory=EncoderTuning, description="unfreeze the image encoder (BLIP-2's fine-tuning)")
    lora: LoraTuning | None = Field(None, description="LoRA adapters on the LLM, stage 2 only (null: none; {} : the defaults)")

    @property
    def active(self) -> bool:
        return self.encoder.trains or self.lora is not None

    def describe(self) -> str:
        """One line naming each recipe that is on."""
        parts = [f"encoder: {self.encoder.describe()}" if self.encoder.trains else "",
                 f"LoRA: {self.lora.describe()}" if self.lora is not None else ""]
        return "; ".join(p for p in parts if p) or "connector only (encoder and LLM frozen)"


def finetune_problems(finetune: FinetuneConfig, *, stage: int, features: str | None) -> list[str]:
    """What the finetune section asks that the rest of the config rules out (torch-free)."""
    problems = []
    encoder = finetune.encoder
    if not encoder.trains:
        if encoder.lr is not None:
            problems.append("finetune.encoder.lr: the encoder is frozen (unfreeze: none); set unfreeze to all or N, or drop lr")
        if encoder.layer_decay != 1:
            problems.append("finetune.encoder.layer_decay: the encoder is frozen (unfreeze: none); set unfreeze to all or N, or drop it")
        if encoder.grad_checkpointing:
            problems.append("finetune.encoder.grad_checkpointing: the encoder is frozen (unfreeze: none) and runs without gradients; "
                            "set unfreeze to all or N, or drop it")
    elif features is not None:
        problems.append("data.features: the feature cache holds the frozen encoder's outputs, but finetune.encoder.unfreeze trains "
                        "the encoder, so they would be stale after the first step; drop data.features (train from images) "
                        "or set finetune.encoder.unfreeze: none")
    if finetune.lora is not None and stage != 2:
        problems.append("finetune.lora: LoRA adapts the LLM, which only stage 2 runs; set stage: 2 or drop finetune.lora")
    return problems
