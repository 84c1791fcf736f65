"""Read a transformers `config.json` from a local directory, without importing transformers or torch,
so an LLM's dimensions can be validated from its weights' own config before anything loads."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any


def looks_local(model: str) -> bool:
    """A path rather than a hub id ("org/name"): absolute, relative with ./ or ../, ~, or existing."""
    return model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists()


@lru_cache(maxsize=32)
def _read(path: str, mtime: float) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def local_config(model: str | None) -> dict[str, Any] | None:
    """The parsed config.json of a local model directory; None for a hub id or no model.

    Raises ValueError (surfacing as an option error) for a local path that is not a model directory.
    """
    if not model or not looks_local(model):
        return None
    directory = Path(model).expanduser()
    config = directory / "config.json"
    if not directory.is_dir():
        raise ValueError(f"model directory not found: {model}")
    if not config.is_file():
        raise ValueError(f"{model} has no config.json; give a directory written by save_pretrained")
    return _read(str(config.resolve()), config.stat().st_mtime)
