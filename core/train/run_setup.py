"""What a training run is built from, before its first step: the model (with init_from's weights and
the fine-tuning recipe), the objective, the refusal to overwrite an earlier run, and the comparison of
a checkpoint's settings with the config that resumes it. Kept apart from the loop in trainer.py,
which reads as the run itself."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from vlbridge.assemblies.assembly import Assembly
from vlbridge.errors import UntrainedWarning, VLBridgeError, WeightsError
from vlbridge.files.checkpoint import read_meta
from vlbridge.files.checkpoint_paths import ASSEMBLY_FILE, unpointed_checkpoints
from vlbridge.files.checkpoint_source import resolve_checkpoint
from vlbridge.files.userfiles import read_yaml
from vlbridge.modeling import factory
from vlbridge.modeling.connector_protocol import mark_trained
from vlbridge.modeling.model import VLBridgeModel
from vlbridge.train import checkpointing as ckpt
from vlbridge.train.config import TrainConfig
from vlbridge.train.finetune import Recipe, apply_finetune

Objective = Callable[[VLBridgeModel, Mapping[str, Any]], dict[str, torch.Tensor]]


def setting_differences(saved: Any, now: Any, path: str) -> list[str]:
    """Where two config values differ, as 'a.b.c: X in the checkpoint, Y now', leaf by leaf."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [d for key in dict.fromkeys([*saved, *now]) for d in setting_differences(saved.get(key), now.get(key), f"{path}.{key}")]
    return [] if saved == now else [f"{path}: {saved!r} in the checkpoint, {now!r} now"]



def refuse_existing_run(output_dir: Path) -> None:
    """Never overwrite a run by accident: continuing it takes --resume."""
    latest = ckpt.latest_checkpoint(output_dir)
    if latest is not None:
        raise VLBridgeError(f"output_dir {output_dir} already holds checkpoints (latest: {latest.name}); "
                            "pass --resume to continue that run, or choose another output_dir")
    problem = unpointed_checkpoints(output_dir)
    if problem is not None:
        raise VLBridgeError(f"output_dir {output_dir}: {problem}; or choose another output_dir")


def build_model(config: TrainConfig, assembly: Assembly, device: torch.device) -> tuple[VLBridgeModel, Recipe]:
    """The assembly's model for this stage, starting from init_from's connector weights (and the
    encoder tensors and LoRA adapters it fine-tuned, if any), with the config's fine-tuning recipes applied."""
    weights = resolve_checkpoint(config.init_from, "init_from").directory if config.init_from is not None else None
    try:
        with warnings.catch_warnings():  # init_from's tensors this stage alone trains: this run trains them
            warnings.simplefilter("ignore", UntrainedWarning)
            model = factory.build(assembly, stage=config.stage, weights=weights, device=device, random_weights=config.random_weights,
                                   init_seed=config.seed)  # a checkpoint's fine-tuned encoder tensors and adapters come with it
    except WeightsError as exc:
        raise VLBridgeError(f"init_from: {exc}") from exc
    recipe = apply_finetune(model, config.finetune, config.optimizer.lr)
    mark_trained(model.connector)  # what init_from lacked but this run trains
    return model.to(device), recipe


def other_llm_note(config: TrainConfig, assembly: Assembly) -> str | None:
    """A note when init_from's connector was trained (stage 2) into another LLM than this run's:
    its output layer starts from weights fitted to another embedding space, which is allowed (the
    widths fit) but rarely meant."""
    if config.init_from is None or config.stage != 2 or assembly.config.llm is None:
        return None
    directory = resolve_checkpoint(config.init_from, "init_from").directory
    if int(read_meta(directory)["stage"]) != 2:
        return None
    theirs = str(((read_yaml(directory / ASSEMBLY_FILE, "checkpoint assembly") or {}).get("llm") or {}).get("use", ""))
    ours = assembly.plan.llm.name if assembly.plan.llm is not None else ""
    if theirs.rpartition(":")[2] in ("", ours):  # 'distribution:name' as a checkpoint pins a plugin part
        return None
    return (f"note: init_from {directory} trained its connector into the LLM {theirs!r}, and this run bridges to {ours!r}: "
            "its projection starts from weights fitted to another LLM's embeddings")


def default_objective(config: TrainConfig, model: VLBridgeModel) -> Objective:
    """BLIP-2's objective for the stage (ITC + ITM + ITG, or the LLM's LM loss), checked against the model."""
    from vlbridge.train.objectives import objective_for

    options = {**config.objective, **({"prompt": config.prompt} if config.prompt is not None else {})}
    return objective_for(model, **options)
