"""What a checkpoint argument (`-c DIR`, a training config's `init_from`) points at, and the one
directory to load from it: a vlbridge checkpoint as it is, a training run's output_dir as its latest
step (said aloud), and for anything else a message saying what the directory is and what to do,
e.g. the exact `vlbridge import` command for a transformers BLIP-2 / InstructBLIP / LLaVA directory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vlbridge.errors import WeightsError
from vlbridge.files.checkpoint_paths import LATEST, META_FILE, RUN_CHECKPOINTS, latest_checkpoint, step_dirs

# A transformers directory vlbridge can import: config.json's model_type -> `vlbridge import` format.
IMPORTABLE = {"blip-2": "hf-blip2", "instructblip": "hf-instructblip", "llava": "hf-llava"}
ARCHITECTURES = {"Blip2ForConditionalGeneration": "blip-2", "InstructBlipForConditionalGeneration": "instructblip",
                 "LlavaForConditionalGeneration": "llava"}


@dataclass(frozen=True)
class CheckpointSource:
    """The checkpoint directory to load, and a note for the user when it is not the one given."""

    directory: Path
    note: str | None = None


def resolve_checkpoint(given: str | Path, option: str = "--checkpoint") -> CheckpointSource:
    """The vlbridge checkpoint `given` names (itself, or a run output_dir's latest step); otherwise a
    WeightsError that says what `given` is and what `option` needs instead."""
    path = Path(given).expanduser()
    if not path.exists():
        raise WeightsError(f"{option} {given}: no such directory; expected a vlbridge checkpoint directory "
                           "(model.save, vlbridge import) or a training run's output_dir")
    if not path.is_dir():
        hint = (f"; a weights file goes with --assembly PRESET_OR_YAML --weights {given}"
                if path.suffix in (".safetensors", ".pth", ".bin") else "")
        raise WeightsError(f"{option} {given} is a file, not a checkpoint directory{hint}")
    if (path / META_FILE).is_file():
        return CheckpointSource(path)
    run = _latest_of_run(path, option, given)
    if run is not None:
        return run
    raise WeightsError(f"{option} {given} is not a vlbridge checkpoint (no {META_FILE}) nor a training run's output_dir: "
                       f"{_what_it_is(path)}")


def _latest_of_run(path: Path, option: str, given: str | Path) -> CheckpointSource | None:
    """A training run's output_dir: its `latest` step when it names one; several steps and no
    pointer is ambiguous, so that is an error listing them."""
    if not (path / RUN_CHECKPOINTS).is_dir():
        return None
    latest = latest_checkpoint(path)
    if latest is not None:
        note = f"{option} {given} is a training run's output_dir; using its latest checkpoint {latest} ({latest.name})"
        return CheckpointSource(latest, note)
    steps = [str(step) for _, step in step_dirs(path)]
    if not steps:
        raise WeightsError(f"{option} {given} is a training run's output_dir without any saved checkpoint yet "
                           f"(nothing under {path / RUN_CHECKPOINTS}); train until it saves one, or give a checkpoint directory")
    raise WeightsError(f"{option} {given} is a training run's output_dir without a {RUN_CHECKPOINTS}/{LATEST} pointer; "
                       f"give one of its steps: {', '.join(steps)}")


def _what_it_is(path: Path) -> str:
    """A sentence on what the directory holds instead, with the next step to take."""
    config = _read_config(path / "config.json")
    if config is None:
        return "expected a directory written by model.save() or vlbridge import, or a training run's output_dir (checkpoints/step-N)"
    model_type = config.get("model_type")
    architectures = config.get("architectures") if isinstance(config.get("architectures"), list) else []
    found = model_type if model_type in IMPORTABLE else next((ARCHITECTURES[a] for a in architectures if a in ARCHITECTURES), None)
    if found is not None:
        return (f"it is a transformers {found} model directory; convert it once with "
                f"`vlbridge import {IMPORTABLE[found]} {path} OUT_DIR`, then use --checkpoint OUT_DIR")
    kinds = ", ".join(f"{kind} (vlbridge import {fmt})" for kind, fmt in IMPORTABLE.items())
    if not isinstance(model_type, str):
        return f"its config.json names no transformers model_type; vlbridge imports {kinds}"
    return (f"it holds a transformers {model_type!r} model, which is not a vision-language checkpoint vlbridge imports "
            f"(it imports {kinds}); to use it as a frozen part, name it in an assembly's options (e.g. llm: "
            f"{{use: hf-causal-lm, options: {{model: {path}}}}})")


def _read_config(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
