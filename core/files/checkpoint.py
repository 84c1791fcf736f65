"""vlbridge checkpoints: the trainable weights only, as safetensors, beside the assembly YAML.

Frozen parts are not copied: loading re-assembles them from the sources the assembly names (local
weights or hub ids). What a fine-tuning run changed beyond the connector (an unfrozen encoder's
tensors, LoRA adapters on the LLM) is written beside it as extra parts (see `vlbridge.finetune.tuning`). A connector checkpoint records the stage it was trained in; loading it is strict
about that stage's parameters.

connector.safetensors holds the connector's whole state, trained in this stage or not (a stage-2
checkpoint keeps the Q-Former's stage-1 text side and heads), so `load` computes what the saved
model computed. Tensors the saved model itself lacked (it was loaded from an older or imported
checkpoint without them) are listed in checkpoint.json's manifest, `connector.absent`, instead:
loading marks them absent again and whatever needs them refuses to run (vlbridge.modeling.connector_protocol).
Checkpoints without the manifest (older ones, imports) are read the same way: what the file lacks
is absent.

checkpoint.json's `trained_stages` lists the stages whose training the connector's tensors went
through: the checkpoint's own stage plus those of the checkpoint its run started from (init_from),
carried forward. A stage-1 checkpoint whose run started from a stage-2 one holds a trained
projection into the LLM; its `stage` alone cannot say so. Older checkpoints lack the field: only
their own stage is known (`trained_stages`).
"""

from __future__ import annotations

import copy
import os
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import yaml
from safetensors.torch import save_file

from vlbridge.files.atomic import atomic_write, atomic_write_text
from vlbridge.files.checkpoint_paths import ASSEMBLY_FILE, META_FILE, RELATIVE_PATHS, resolve_relative_paths
from vlbridge.errors import WeightsError
from vlbridge.files.userfiles import read_json, read_yaml
from vlbridge.files.weights import StateDict, read_tensors, require_path, unwrap_state_dict

WEIGHTS_FILE = "connector.safetensors"
FORMAT, VERSION = "vlbridge-checkpoint", 1  # checkpoint.json's "format", and the newest "version" this code reads
TRAINED_STAGES = "trained_stages"  # checkpoint.json: the stages whose training its connector tensors went through


@dataclass(frozen=True)
class ExtraPart:
    """Tensors written beside the connector's: `file` in the checkpoint directory, `meta` under
    `key` in checkpoint.json (what rebuilding the part needs)."""

    key: str
    file: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


@dataclass(frozen=True)
class ConnectorState:
    """What a checkpoint keeps of a connector: every tensor it has values for, and the names of
    those it lacks (absent since it was loaded from a checkpoint without them)."""

    tensors: dict[str, torch.Tensor]
    absent: list[str]


def save_checkpoint(out_dir: str | Path, assembly_dict: dict[str, Any], state: ConnectorState, stage: int,
                    extra: dict[str, Any] | None = None, parts: Sequence[ExtraPart] = (), trained_stages: Iterable[int] = ()) -> Path:
    """Checkpoint a connector's whole state (vlbridge.modeling.connector_protocol.connector_state), as
    trained in `stage` (after `trained_stages`), beside its assembly (and any extra parts)."""
    return write_checkpoint(out_dir, assembly_dict, state.tensors, stage, extra, parts, absent=state.absent,
                            trained_stages=trained_stages)


def write_checkpoint(out_dir: str | Path, assembly_dict: dict[str, Any], tensors: dict[str, torch.Tensor], stage: int,
                     extra: dict[str, Any] | None = None, parts: Sequence[ExtraPart] = (),
                     absent: Sequence[str] | None = None, trained_stages: Iterable[int] = ()) -> Path:
    """Write assembly.yaml, connector.safetensors, each extra part's file, and checkpoint.json (last,
    so its presence means done; an earlier checkpoint.json in `out_dir` goes first, so a save
    interrupted over an old checkpoint leaves none rather than the old metadata over new weights).

    `absent`: the connector tensors the saved model lacked, for a whole-state checkpoint (written as
    the `connector.absent` manifest); None for tensors of another origin (an import: no manifest).

    `trained_stages`: the stages the tensors went through before this one (those of the checkpoint
    they were loaded from); recorded with `stage` added. An import passes none: its own stage is
    what its file shows (a projection into the LLM: stage 2).

    `extra["allow_missing"]` lists fnmatch patterns of stage-`stage` parameters the file lacks on
    purpose (e.g. an imported model without an ITG head); loading names them instead of failing.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # saving over a checkpoint: until the new one is whole, there is none
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    assembly_dict, relative = relative_paths(assembly_dict, out)
    atomic_write_text(out / ASSEMBLY_FILE, yaml.safe_dump(assembly_dict, sort_keys=False))
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"stage": str(stage)}))
    for part in parts:
        part_tensors = {name: t.detach().contiguous().cpu() for name, t in part.tensors.items()}
        atomic_write(out / part.file, lambda tmp, t=part_tensors: save_file(t, str(tmp), metadata={"part": part.key}))
    manifest = {} if absent is None else {"connector": {"absent": sorted(absent)}}
    meta = {"format": FORMAT, "version": VERSION, "stage": stage, TRAINED_STAGES: sorted({*trained_stages, stage}),
            "tensors": len(tensors), **manifest,
            **({RELATIVE_PATHS: relative} if relative else {}), **(extra or {}),
            **{part.key: part.meta for part in parts}}
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=2))
    return out


def relative_paths(assembly_dict: dict[str, Any], out: Path, within: Path | None = None) -> tuple[dict[str, Any], list[str]]:
    """The assembly with every option naming a path inside `within` (default: `out` itself) rewritten
    relative to `out` ("./llm", or "../bert" for a sibling of `out`), and where those options are
    ("llm.options.model"): a checkpoint stays loadable when moved (with `within`, when moved with it)."""
    assembly_dict, moved = copy.deepcopy(assembly_dict), []
    for slot in ("encoder", "connector", "llm"):
        options = (assembly_dict.get(slot) or {}).get("options") or {}
        for key, value in options.items():
            path = Path(value).expanduser() if isinstance(value, str) else None
            relative = _relative_inside(path, out, within or out) if path is not None and path.is_absolute() else None
            if relative is not None:
                options[key] = relative
                moved.append(f"{slot}.options.{key}")
    return assembly_dict, moved


def _relative_inside(path: Path, out: Path, root: Path) -> str | None:
    """`path` relative to `out` ("./x", "../x") where it lies inside `root`, else None. Compared as
    written (a part that is a symlink stays that link) and, failing that, with links resolved."""
    for norm in (lambda p: Path(os.path.abspath(p)), Path.resolve):
        target, inside = norm(path), norm(root)
        if target.is_relative_to(inside):
            relative = Path(os.path.relpath(target, norm(out))).as_posix()
            return relative if relative.startswith("../") else "./" + relative
    return None


def checkpoint_assembly(ckpt_dir: str | Path) -> Path | dict[str, Any]:
    """What `build` takes for a checkpoint's assembly: the YAML file itself, or, where checkpoint.json
    lists options holding paths relative to the checkpoint, the mapping with those resolved against it."""
    directory = Path(ckpt_dir)
    relative = read_meta(directory).get(RELATIVE_PATHS) or []
    if not relative:
        return directory / ASSEMBLY_FILE
    return resolve_relative_paths(read_yaml(directory / ASSEMBLY_FILE, "checkpoint assembly"), directory, [str(w) for w in relative])


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    """checkpoint.json of a checkpoint directory, checked to be an object with the stage it was saved in."""
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        raise WeightsError(f"{ckpt_dir} is not a vlbridge checkpoint (no {META_FILE}); expected a directory written by save()")
    meta = read_json(path, "checkpoint metadata", top=dict)
    fmt, version = meta.get("format", FORMAT), meta.get("version", VERSION)
    if fmt != FORMAT:
        raise WeightsError(f"checkpoint metadata {str(path)!r}: 'format' is {fmt!r}, not {FORMAT!r}; this folder holds "
                           "another program's checkpoint (vlbridge import converts BLIP-2, InstructBLIP, LLaVA and LAVIS ones)")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= VERSION:
        raise WeightsError(f"checkpoint metadata {str(path)!r}: version {version!r} is not one this vlbridge reads (1 to "
                           f"{VERSION}); a newer vlbridge wrote it, or the file was edited")
    stage = meta.get("stage")
    if not isinstance(stage, int) or isinstance(stage, bool) or stage not in (1, 2):
        raise WeightsError(f"checkpoint metadata {str(path)!r}: 'stage' must be the training stage (1 or 2), found {stage!r}; "
                           "expected the checkpoint.json that save() writes")
    return meta


def listed_absent(meta: dict[str, Any], ckpt_dir: str | Path) -> list[str]:
    """The manifest's absent connector tensors (none for a checkpoint without the manifest)."""
    manifest = meta.get("connector", {"absent": []})
    absent = manifest.get("absent") if isinstance(manifest, dict) else None
    if not isinstance(absent, list) or not all(isinstance(name, str) for name in absent):
        raise WeightsError(f"{Path(ckpt_dir) / META_FILE}: 'connector' must be an object whose 'absent' lists tensor names, "
                           f"found {manifest!r}; expected the manifest that save() writes")
    return absent


def listed_trained_stages(meta: dict[str, Any], ckpt_dir: str | Path) -> tuple[int, ...] | None:
    """The stages whose training a checkpoint's connector tensors went through; None for one saved
    before checkpoints recorded it (its own `stage` is all that is known of it)."""
    if TRAINED_STAGES not in meta:
        return None
    stages = meta[TRAINED_STAGES]
    if not isinstance(stages, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s in (1, 2) for s in stages) \
            or meta["stage"] not in stages:
        raise WeightsError(f"{Path(ckpt_dir) / META_FILE}: {TRAINED_STAGES!r} must list the training stages (1, 2) its tensors went "
                           f"through, its own stage {meta['stage']} among them; found {stages!r}; expected the checkpoint.json "
                           "that save() writes")
    return tuple(sorted(set(stages)))


def read_connector_weights(path: str | Path, *, shapes_only: bool = False) -> StateDict:
    """A connector's tensors from our safetensors or a weights-only .pth/.bin (LAVIS wraps it in 'model');
    `shapes_only`: meta tensors from the header (vlbridge.files.weights.read_tensors)."""
    path = require_path(path, "connector weights")
    return unwrap_state_dict(read_tensors(path, shapes_only=shapes_only), str(path))
