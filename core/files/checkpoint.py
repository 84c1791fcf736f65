"""vlbridge checkpoints: the trainable weights only, as safetensors, beside the assembly YAML.

Frozen parts are not copied: loading re-assembles them from the sources the assembly names (local
weights or hub ids). What a fine-tuning run changed beyond the connector (an unfrozen encoder's
tensors, LoRA adapters on the LLM) is written beside it as extra parts (see `vlbridge.finetune.tuning`). A connector checkpoint records the stage it was trained in; loading it is strict
about that stage's parameters and names the ones it leaves as initialised (e.g. the Q-Former's text
side after stage 2), instead of a silent partial load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from vlbridge.files.atomic import atomic_write, atomic_write_text
from vlbridge.errors import WeightsError
from vlbridge.files.userfiles import read_json
from vlbridge.files.weights import StateDict, read_tensors, require_path, unwrap_state_dict

ASSEMBLY_FILE = "assembly.yaml"
WEIGHTS_FILE = "connector.safetensors"
META_FILE = "checkpoint.json"


@dataclass(frozen=True)
class ExtraPart:
    """Tensors written beside the connector's: `file` in the checkpoint directory, `meta` under
    `key` in checkpoint.json (what rebuilding the part needs)."""

    key: str
    file: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def trainable_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that currently require gradients, detached and contiguous (safetensors needs it)."""
    return {name: p.detach().contiguous().cpu() for name, p in module.named_parameters() if p.requires_grad}


def save_checkpoint(out_dir: str | Path, assembly_dict: dict[str, Any], connector: nn.Module, stage: int,
                    extra: dict[str, Any] | None = None, parts: Sequence[ExtraPart] = ()) -> Path:
    """Checkpoint a connector's trainable weights for `stage` beside its assembly (and any extra parts)."""
    return write_checkpoint(out_dir, assembly_dict, trainable_state_dict(connector), stage, extra, parts)


def write_checkpoint(out_dir: str | Path, assembly_dict: dict[str, Any], tensors: dict[str, torch.Tensor], stage: int,
                     extra: dict[str, Any] | None = None, parts: Sequence[ExtraPart] = ()) -> Path:
    """Write assembly.yaml, connector.safetensors, each extra part's file, and checkpoint.json (last,
    so its presence means done).

    `extra["allow_missing"]` lists fnmatch patterns of stage-`stage` parameters the file lacks on
    purpose (e.g. an imported model without an ITG head); loading names them instead of failing.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    atomic_write_text(out / ASSEMBLY_FILE, yaml.safe_dump(assembly_dict, sort_keys=False))
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"stage": str(stage)}))
    for part in parts:
        part_tensors = {name: t.detach().contiguous().cpu() for name, t in part.tensors.items()}
        atomic_write(out / part.file, lambda tmp, t=part_tensors: save_file(t, str(tmp), metadata={"part": part.key}))
    meta = {"format": "vlbridge-checkpoint", "version": 1, "stage": stage, "tensors": len(tensors), **(extra or {}),
            **{part.key: part.meta for part in parts}}
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=2))
    return out


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    """checkpoint.json of a checkpoint directory, checked to be an object with the stage it was saved in."""
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        raise WeightsError(f"{ckpt_dir} is not a vlbridge checkpoint (no {META_FILE}); expected a directory written by save()")
    meta = read_json(path, "checkpoint metadata", top=dict)
    stage = meta.get("stage")
    if not isinstance(stage, int) or isinstance(stage, bool):
        raise WeightsError(f"checkpoint metadata {str(path)!r}: 'stage' must be the training stage (1 or 2), found {stage!r}; "
                           "expected the checkpoint.json that save() writes")
    return meta


def read_connector_weights(path: str | Path) -> StateDict:
    """A connector's tensors from our safetensors or a weights-only .pth/.bin (LAVIS wraps it in 'model')."""
    path = require_path(path, "connector weights")
    return unwrap_state_dict(read_tensors(path), str(path))
