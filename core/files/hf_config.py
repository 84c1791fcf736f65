"""Local transformers directories: read a `config.json` without importing transformers or torch, so an
LLM's dimensions can be validated from its weights' own config before anything loads; and, when a
load from such a directory fails, name the file in it that is broken."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from vlbridge.errors import InputFileError, VLBridgeError, WeightsError
from vlbridge.files.pickles import refused_pickle
from vlbridge.files.userfiles import read_json


PATH_PREFIXES = ("/", "./", "../", "~")  # how a value says it is a path, not a hub id ("org/name") or a tag


def looks_local(model: str) -> bool:
    """A path rather than a hub id ("org/name"): absolute, relative with ./ or ../, ~, or existing."""
    return model.startswith(PATH_PREFIXES) or Path(model).expanduser().exists()


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
    from vlbridge.files.weights import tensor_keys  # torch, only when a load has already failed

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


CUSTOM_CODE = ("it names Python code of its own (an auto_map in its config or tokenizer_config.json), and vlbridge never "
               "runs code that comes with a model; use a model whose architecture transformers itself implements")


def custom_code(exc: BaseException) -> bool:
    """Whether a from_pretrained failed because the model needs its own code (vlbridge passes trust_remote_code=False)."""
    return isinstance(exc, ValueError) and "trust_remote_code=True" in str(exc)


def load_failure(what: str, source: str | Path, exc: Exception, fix: str) -> VLBridgeError:
    """The error for a failed from_pretrained of `what`: for a local directory, naming its broken file
    when one is found; else transformers' own message and `fix`."""
    directory = Path(source).expanduser()
    broken = unreadable_file(directory) if looks_local(str(source)) and directory.is_dir() else None
    if broken:
        return VLBridgeError(f"could not load {what} from {str(source)!r}: {broken}; re-save it there with save_pretrained(<dir>)")
    if custom_code(exc):
        return VLBridgeError(f"could not load {what} from {str(source)!r}: {CUSTOM_CODE}")
    refused = refused_pickle(exc)
    if refused:
        return VLBridgeError(f"could not load {what} from {str(source)!r}: its weights file is refused: {refused}; "
                             "re-save the model with save_pretrained(<dir>) (safetensors)")
    return VLBridgeError(f"could not load {what} from {str(source)!r} ({type(exc).__name__}: {exc}); {fix}")


HUB_CONFIGS = Path(__file__).resolve().parent / "hub_configs.json"


@lru_cache(maxsize=1)
def _known_hub_configs() -> dict[str, Any]:
    table = read_json(HUB_CONFIGS, "vlbridge's table of hub configs", top=dict)
    return {key: value for key, value in table.items() if not key.startswith("_")}


def cached_hub_file(repo_id: str, name: str) -> Path | None:
    """The path of a hub repository's file in the local Hugging Face cache (no network), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache  # torch-free
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, name)
    except Exception:  # a malformed repo id: not a hub model we can read
        return None
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def cached_hub_config(repo_id: str) -> dict[str, Any] | None:
    """The config.json of a hub model as the local Hugging Face cache holds it (no network), or None."""
    found = cached_hub_file(repo_id, "config.json")
    return None if found is None else _read(str(found), found.stat().st_mtime)


def model_config(model: str) -> dict[str, Any]:
    """The config.json of a model, read without torch and without the network: a local directory's,
    else the Hugging Face cache's copy of a hub id's, else vlbridge's small table of popular hub
    models (`hub_configs.json`). Raises ValueError (an option error) saying how to make it readable."""
    local = local_config(model)
    if local is not None:
        return local
    cached = cached_hub_config(model)
    if cached is not None:
        return cached
    known = _known_hub_configs().get(model)
    if known is not None:
        return known
    raise ValueError(f"cannot read the config.json of {model!r} offline: it is not a local directory, the Hugging Face "
                     "cache has no copy of it, and vlbridge's table of hub configs does not list it; give a local "
                     f"directory written by save_pretrained, or fetch it once where the hub is reachable "
                     f"(`huggingface-cli download {model} config.json`)")


def transformers_config(src: Path, model_type: str, model_class: str) -> dict[str, Any]:
    """The config.json of a transformers directory that must hold a `model_type` model (a converter's
    input); WeightsError naming what is missing or what the directory holds instead."""
    path = Path(src) / "config.json"
    if not path.is_file():
        raise WeightsError(f"{src} is not a transformers directory: it has no config.json; give a directory written by "
                           f"{model_class}.save_pretrained")
    config = read_json(path, "transformers config", top=dict)
    if config.get("model_type") != model_type:
        raise WeightsError(f"{path} has model_type {config.get('model_type')!r}; expected {model_type!r} ({model_class})")
    from transformers import CONFIG_MAPPING

    try:  # what transformers cannot read (a string for a number, a list for a sub-config) is refused here, by field
        CONFIG_MAPPING[model_type].from_dict(config)
    except Exception as exc:  # transformers raises TypeError, ValueError and its own validation errors
        raise WeightsError(f"{path} is not a config transformers can read for {model_class} ({type(exc).__name__}: {exc})") from None
    return config
