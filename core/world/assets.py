"""Where the world's shipped frozen parts live (`vlbridge/plugins/world/`), torch-free.

Each part is an ordinary checkpoint directory that states its own architecture (config.json); the
`world-*` presets point eva-vit-g's `pretrained`, the Q-Former's `bert` and the LLMs' `model` at
them ("{world}/opt", ...). `python -m vlbridge.world.train_parts --out DIR` writes the same layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlbridge.errors import WeightsError

PARTS: tuple[str, ...] = ("eva-vit-g", "opt", "flan-t5", "bert")
STAGE1_QUERIES: tuple[int, ...] = (32, 8)  # the shipped stage-1 Q-Formers (vlbridge.compare.stage1_parts trains them)
STAGE1_COMMAND = "python -m vlbridge.compare.stage1_parts --out"
MANIFEST = "manifest.json"
ENCODER_FILE = "model.safetensors"  # inside the eva-vit-g folder; the others are transformers folders
ENCODER_MODEL_TYPE = "eva-vit"  # the encoder folder's config.json: this model_type and eva-vit-g's option names


def world_dir() -> Path:
    """The shipped folder (next to the plugin modules, so an installed package has it too)."""
    import vlbridge.plugins

    return Path(vlbridge.plugins.__file__).resolve().parent / "world"


def part_dir(part: str, root: str | Path | None = None) -> Path:
    """The folder of one part ("eva-vit-g", "opt", "flan-t5" or "bert"); an error names what is missing."""
    if part not in PARTS:
        raise WeightsError(f"no world part {part!r}; the parts are {PARTS}")
    path = (Path(root) if root is not None else world_dir()) / part
    if not path.is_dir() or not any(path.iterdir()):
        raise WeightsError(f"the world's {part} weights are missing at {path}; regenerate them with "
                           f"python -m vlbridge.world.train_parts --out {path.parent}")
    return path


def encoder_weights(root: str | Path | None = None) -> Path:
    """The world encoder's safetensors file (EVA names, as eva-vit-g's `pretrained` reads them)."""
    return part_dir("eva-vit-g", root) / ENCODER_FILE


def read_parts_manifest(root: str | Path | None = None) -> dict[str, Any]:
    """What was trained how: sizes, data seed, script version, times and verification numbers."""
    path = (Path(root) if root is not None else world_dir()) / MANIFEST
    if not path.is_file():
        raise WeightsError(f"no world parts manifest at {path}; regenerate with python -m vlbridge.world.train_parts")
    return json.loads(path.read_text(encoding="utf-8"))


def stage1_checkpoint(queries: int, root: str | Path | None = None) -> Path:
    """The shipped stage-1 Q-Former checkpoint with `queries` queries ("qformer-32q"); an error says
    which exist and how to make one."""
    if queries not in STAGE1_QUERIES:
        raise WeightsError(f"no shipped stage-1 Q-Former with {queries} queries; the shipped ones have {list(STAGE1_QUERIES)} "
                           "(train a stage 1 in the run instead, e.g. `vlbridge demo --stage1 train`)")
    base = Path(root) if root is not None else world_dir()
    path = base / f"qformer-{queries}q"
    if not (path / "checkpoint.json").is_file():
        raise WeightsError(f"the world's stage-1 Q-Former ({queries} queries) is missing at {path}; regenerate it with "
                           f"{STAGE1_COMMAND} {base}")
    listed = read_parts_manifest(base).get("parts", {}) if (base / MANIFEST).is_file() else {}
    stale = listed.get(path.name, {}).get("stale")
    if stale:
        raise WeightsError(f"the world's stage-1 Q-Former at {path} no longer matches its frozen parts: {stale}")
    return path
