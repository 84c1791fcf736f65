"""Local transformers directories: read a `config.json` without importing transformers or torch, so an
LLM's dimensions can be validated from its weights' own config before anything loads; and, when a
load from such a directory fails, name the file in it that is broken."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from vlbridge.errors import InputFileError, VLBridgeError, WeightsError
from vlbridge.userfiles import read_json


def looks_local(model: str) -> bool:
    """A path rather than a hub id ("org/name"): absolute, relative with ./ or ../, ~, or existing."""
    return model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists()


@lru_cache(maxsize=32)
def _read(path: str, mtime: float) -> dict[str, Any]:
    return read_json(path, "model config", top=dict)  # an InputFileError is a ValueError: an option error


def read_local_json(directory: str, name: str) -> dict[str, Any] | None:
    """DIRECTORY/NAME parsed, when `directory` is an existing local directory holding that file;
    None otherwise (a hub id, a file path, or no such file)."""
    path = Path(directory).expanduser() / name
    if not looks_local(directory) or not path.is_file():
        return None
    return _read(str(path.resolve()), path.stat().st_mtime)


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


def unreadable_file(directory: str | Path) -> str | None:
    """Why the first unreadable JSON or safetensors file of a save_pretrained directory is so, or None.

    transformers' errors for a broken file (a JSONDecodeError, a SafetensorError, a tokenizers
    Exception) rarely say which file; this finds it, once a load has failed.
    """
    from vlbridge.weights import tensor_keys  # torch, only when a load has already failed

    directory = Path(directory).expanduser()
    for path in sorted(directory.glob("*.json")):
        try:
            read_json(path, "file")
        except InputFileError as exc:
            return str(exc)
    for path in sorted(directory.glob("*.safetensors")):
        try:
            tensor_keys(path)
        except WeightsError as exc:
            return str(exc)
    return None


def load_failure(what: str, source: str | Path, exc: Exception, fix: str) -> VLBridgeError:
    """The error for a failed from_pretrained of `what`: for a local directory, naming its broken file
    when one is found; else transformers' own message and `fix`."""
    directory = Path(source).expanduser()
    broken = unreadable_file(directory) if looks_local(str(source)) and directory.is_dir() else None
    if broken:
        return VLBridgeError(f"could not load {what} from {str(source)!r}: {broken}; re-save it there with save_pretrained(<dir>)")
    return VLBridgeError(f"could not load {what} from {str(source)!r} ({type(exc).__name__}: {exc}); {fix}")
