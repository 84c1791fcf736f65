"""Where the model of `caption`, `ask`, `retrieve`, `eval` and `cache-features` comes from, checked
in the order that makes a mistake cheapest to hear about: the assembly name torch-free first (a
misspelt preset is reported in a fraction of a second), then the checkpoint directory, the device
(one rule for every command, vlbridge.parts.devices), and only then any weights."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlbridge.assemblies.assembly import Assembly, load_assembly
from vlbridge.errors import VLBridgeError

RANDOM_WEIGHTS_HELP = ("allow real-size frozen parts without pretrained weights (random on purpose, e.g. to time a "
                       "model); without it such an assembly is refused before anything loads")


def add_random_weights_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--random-weights", action="store_true", help=RANDOM_WEIGHTS_HELP)


@dataclass(frozen=True)
class ModelSource:
    """A checked request for a model: an assembly (+ connector weights) or a checkpoint directory."""

    assembly: Assembly | None
    checkpoint: Any  # a Path, or None
    weights: Any  # a Path or the file given, or None
    device: Any  # a torch.device
    random_weights: bool


def check_model_source(args: argparse.Namespace) -> ModelSource:
    """Check -a/-c/--weights/--device without loading any weights; notes (which step of a run's
    output_dir is used) go to stderr."""
    if getattr(args, "checkpoint", None) and getattr(args, "weights", None):
        raise VLBridgeError("--weights goes with --assembly; a --checkpoint already holds its weights")
    assembly = load_assembly(args.assembly) if getattr(args, "assembly", None) else None  # before torch
    random_weights = bool(getattr(args, "random_weights", False))
    if assembly is not None:  # build() checks again; here it is said before torch and torchvision import
        from vlbridge.assemblies.reachability import check_reachable

        check_reachable(assembly, max(assembly.plan.stages), random_weights=random_weights)
    from vlbridge.parts.devices import resolve_device

    checkpoint = resolved_directory(args, "checkpoint", "--checkpoint")
    weights = resolved_directory(args, "weights", "--weights")
    device = resolve_device(args.device)
    return ModelSource(assembly, checkpoint, weights, device, random_weights)


def resolved_directory(args: argparse.Namespace, name: str, option: str) -> Any:
    """A checkpoint directory argument resolved (a run's output_dir -> its latest step, said on stderr);
    a weights file as it is. `option` is how messages name it (--checkpoint, CHECKPOINT_DIR)."""
    from vlbridge.files.checkpoint_source import resolve_checkpoint

    given = getattr(args, name, None)
    if not given or (name == "weights" and Path(given).expanduser().is_file()):
        return given
    if name == "weights" and not Path(given).expanduser().exists():
        raise VLBridgeError(f"{option} {given}: no such file or directory; expected a connector weights file (.safetensors, "
                            "or a .pth/.bin of tensors), a vlbridge checkpoint directory, or a training run's output_dir")
    source = resolve_checkpoint(given, option)
    if source.note:
        print(f"vlbridge {args.command}: {source.note}", file=sys.stderr, flush=True)
    return source.directory


def open_model(source: ModelSource) -> Any:
    """Build or load the model `check_model_source` vetted."""
    import vlbridge

    if source.checkpoint is not None:
        return vlbridge.load(source.checkpoint, device=source.device, random_weights=source.random_weights)
    return vlbridge.build(source.assembly, weights=source.weights, device=source.device, random_weights=source.random_weights)
