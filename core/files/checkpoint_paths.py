"""Where a checkpoint's assembly names paths relative to the checkpoint itself (torch-free).

A checkpoint that carries parts of its own ("./llm", "../bert" beside it) writes those options
relative to its directory and lists them in checkpoint.json, so that it loads after a move. The
list is read wherever the checkpoint's assembly.yaml is read: loading the checkpoint, or naming
its assembly.yaml as an assembly file (`-a CKPT/assembly.yaml`), from any working directory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vlbridge.errors import VLBridgeError, WeightsError
from vlbridge.files.userfiles import read_json, read_text

ASSEMBLY_FILE = "assembly.yaml"
META_FILE = "checkpoint.json"
RUN_CHECKPOINTS = "checkpoints"  # a training run's output_dir keeps its checkpoint steps here
LATEST = "latest"  # RUN_CHECKPOINTS/latest: a text file naming the newest complete step
TRAINER_STATE = "trainer_state.safetensors"  # a run's step is complete once this (or OLD_TRAINER_STATE) is in it
OLD_TRAINER_STATE = "trainer_state.pt"  # what runs wrote before trainer states were safetensors; still resumed
_STEP_DIR = re.compile(r"^step-(\d+)$")
RELATIVE_PATHS = "relative_paths"  # checkpoint.json: the assembly options holding paths relative to the checkpoint


def listed_relative_paths(directory: Path) -> list[str]:
    """The options checkpoint.json in `directory` lists as relative to it ([] without the file or the list)."""
    path = directory / META_FILE
    if not path.is_file():
        return []
    listed = read_json(path, "checkpoint metadata", top=dict).get(RELATIVE_PATHS) or []
    if not isinstance(listed, list) or not all(isinstance(where, str) for where in listed):
        raise WeightsError(f"{path}: {RELATIVE_PATHS!r} must list option names such as 'llm.options.model', found {listed!r}; "
                           "expected the checkpoint.json that save() writes")
    return listed


def resolve_relative_paths(raw: Any, directory: Path, listed: list[str]) -> Any:
    """`raw` (the parsed assembly.yaml of the checkpoint in `directory`) with each listed option made
    absolute against `directory`."""
    for where in listed:
        slot, _, key = where.partition(".options.")
        options = (raw.get(slot) or {}).get("options") if isinstance(raw, dict) else None
        if not isinstance(options, dict) or not isinstance(options.get(key), str):
            raise WeightsError(f"{directory / META_FILE} lists {where!r} among its relative paths, but {directory / ASSEMBLY_FILE} "
                               "has no such path option; the two files do not belong together (re-save or re-import the checkpoint)")
        options[key] = str((directory / options[key]).resolve())
    return raw


def trainer_state_file(step_dir: Path) -> Path | None:
    """The resume state of a step folder: ours, else an older run's .pt; None where the step is not complete."""
    return next((step_dir / name for name in (TRAINER_STATE, OLD_TRAINER_STATE) if (step_dir / name).is_file()), None)


def step_dirs(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint of a training run, oldest first."""
    root = Path(output_dir) / RUN_CHECKPOINTS
    found = []
    for path in root.iterdir() if root.is_dir() else []:
        match = _STEP_DIR.match(path.name)
        if match and trainer_state_file(path) is not None:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names, or None when the run has not saved one yet."""
    pointer = Path(output_dir) / RUN_CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    name = read_text(pointer, "checkpoint pointer").strip()
    path = pointer.parent / name
    if _STEP_DIR.match(name) and trainer_state_file(path) is not None:
        return path
    if not name:  # emptied (a full disk, an editor): it names no step at all, not the checkpoints folder
        found = "is empty"
    elif _STEP_DIR.match(name):
        found = f"names {name}, which is not a complete checkpoint (no {TRAINER_STATE}, nor an older run's {OLD_TRAINER_STATE})"
    else:
        found = f"holds {name!r}, which is not the name of a step folder (step-N)"
    raise VLBridgeError(f"{pointer} {found}; {older_checkpoint_advice(output_dir, path)}")


def only_unpointed_checkpoint(output_dir: str | Path) -> Path | None:
    """The one complete step of a run killed between its first checkpoint's rename and the `latest`
    pointer written after it (no pointer, a single step): --resume continues from it, as there is no
    other to choose; None otherwise (several unpointed steps are `unpointed_checkpoints`' problem)."""
    complete = step_dirs(output_dir)
    return complete[0][1] if len(complete) == 1 and not (Path(output_dir) / RUN_CHECKPOINTS / LATEST).is_file() else None


def unpointed_checkpoints(output_dir: str | Path) -> str | None:
    """What is wrong with a run's checkpoints folder that holds complete steps but no `latest` naming
    one (a lost pointer; a crash between the first step and its pointer), None otherwise. A run started
    there would keep the earlier steps beside its own: pruning keeps the newest numbers (theirs), and
    the way on from a damaged checkpoint would name one of another run."""
    pointer = Path(output_dir) / RUN_CHECKPOINTS / LATEST
    complete = step_dirs(output_dir)
    if pointer.is_file() or not complete:
        return None
    names = ", ".join(p.name for _, p in complete)
    way_on = ("pass --resume to continue from it (the one complete step)" if len(complete) == 1 else
              f"to continue from the newest, write {complete[-1][1].name} into {pointer} and pass --resume")
    return f"{pointer.parent} holds complete checkpoints ({names}) but no {LATEST} file naming one; {way_on}; to start over, remove {pointer.parent}"


def older_checkpoint_advice(output_dir: str | Path, unusable: Path) -> str:
    """How to go on from a run whose checkpoint `unusable` cannot be resumed: from the newest
    complete one besides it, by naming that in `latest`, or from the start."""
    pointer = Path(output_dir) / RUN_CHECKPOINTS / LATEST
    complete = [p for _, p in step_dirs(output_dir) if p != unusable]
    if complete:
        return (f"to resume from the newest complete one, {complete[-1].name}, write that name into {pointer}; "
                f"or remove {pointer.parent} to start over")
    return f"no complete checkpoint is left; remove {pointer.parent} to start over"
