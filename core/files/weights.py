"""Reading checkpoints safely and loading them strictly (one place for every part and format).

Foreign checkpoints come as safetensors, or as pickled `.pth`/`.bin` files that are only ever read
with `torch.load(weights_only=True)`, so a checkpoint cannot run code. Loading is strict: every
parameter of the module must be given with its exact shape and nothing else may be left over;
otherwise a `WeightsError` names the file, the tensors and the shapes. Callers drop what they skip
on purpose (an unused last block, a head) before calling `strict_load`, so skipping stays explicit.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from vlbridge.errors import WeightsError
from vlbridge.files.pickles import refused_pickle
from vlbridge.files.userfiles import read_json

StateDict = dict[str, torch.Tensor]
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip format; its legacy format, a pickle (protocol 2+)
_WRAPPERS = ("state_dict", "model", "module")  # training checkpoints nest the weights under one of these


def require_path(path: str | Path, what: str) -> Path:
    """The path as a Path, or a WeightsError saying which weights were expected there."""
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsError(f"{what} not found: {str(path)!r} does not exist")
    return path


def read_tensors(path: Path, keep: Callable[[str], bool] = lambda key: True, *, shapes_only: bool = False) -> StateDict:
    """Read the tensors of one file whose keys pass `keep` (safetensors reads only those). With
    `shapes_only` they come as meta tensors of the right shape and dtype, from a safetensors file's
    header alone (`vlbridge train --check` compares shapes without reading a byte of data)."""
    if path.is_dir():
        raise WeightsError(f"{path} is a directory; expected the weights file itself")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as file:
                if shapes_only:
                    return {key: _meta_like(file.get_slice(key)) for key in file.keys() if keep(key)}
                return {key: file.get_tensor(key) for key in file.keys() if keep(key)}
        except Exception as exc:  # safetensors raises its own error types
            raise _unreadable_safetensors(path, exc) from exc
    state = unwrap_state_dict(torch_load(path), str(path))  # a pickle has no header: read, then shaped alike
    return {key: value.to("meta") if shapes_only else value for key, value in state.items() if keep(key)}


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def _meta_like(info: object) -> torch.Tensor:
    """A meta tensor with the shape and dtype a safetensors header states for one tensor."""
    dtype = _SAFETENSORS_DTYPES.get(info.get_dtype(), torch.float32)  # type: ignore[attr-defined]  # shapes are what is compared
    return torch.empty(info.get_shape(), dtype=dtype, device="meta")  # type: ignore[attr-defined]


def tensor_keys(path: Path) -> list[str] | None:
    """The tensor names of a safetensors file, from its header alone (None for other formats)."""
    if path.suffix != ".safetensors":
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            return list(file.keys())
    except Exception as exc:
        raise _unreadable_safetensors(path, exc) from exc


def _unreadable_safetensors(path: Path, exc: Exception) -> WeightsError:
    return WeightsError(f"cannot read safetensors file {str(path)!r} ({exc}): it is truncated or not a safetensors "
                        "file; expected one written by safetensors' save_file (or model.save)")


def torch_load(path: Path) -> object:
    """`torch.load` with `weights_only=True`; a file needing arbitrary unpickling is refused."""
    _check_torch_file(path)
    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol: the refusal below says what matters
            warnings.filterwarnings("ignore", message=".*pickle protocol.*", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(f"{str(path)!r} is refused: {refused_pickle(exc)}; re-save its tensors alone "
                           "(a state_dict, best as .safetensors)") from None
    except (RuntimeError, OSError, EOFError) as exc:
        raise WeightsError(f"cannot read checkpoint {str(path)!r}: {exc}") from exc


def _check_torch_file(path: Path) -> None:
    """Refuse a file that is neither of torch.save's formats, which torch.load would misreport as
    a pickle needing more than weights_only."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as exc:
        raise WeightsError(f"cannot read checkpoint {str(path)!r}: {exc}") from exc
    if not head.startswith(_TORCH_MAGIC):
        found = "it is empty" if not head else f"it starts with bytes {head.hex(' ')}"
        raise WeightsError(f"{str(path)!r} is not a PyTorch checkpoint ({found}, neither a zip archive nor a pickle); "
                           "expected a .pth/.bin written by torch.save, or a .safetensors file")


def unwrap_state_dict(obj: object, source: str) -> StateDict:
    """A state dict from a bare one or a training checkpoint ({'state_dict'|'model'|'module': ...})."""
    while isinstance(obj, Mapping) and not _all_tensors(obj):
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise WeightsError(
                f"{source} is not a state dict: its top-level keys are {_short(list(obj))}; expected tensors "
                f"or a checkpoint with one of {list(_WRAPPERS)}"
            )
        obj = inner
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{source} holds a {type(obj).__name__}, not a state dict of tensors")
    state = dict(obj)
    if state and all(key.startswith("module.") for key in state):  # saved from DistributedDataParallel
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return state


def _all_tensors(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def strict_load(module: nn.Module, state: StateDict, source: str) -> None:
    """Load every parameter and buffer of `module` from `state`, or raise WeightsError saying why.

    Tensors are cast to the module's dtypes. A module built on the meta device takes the tensors
    themselves (assign), which avoids initialising weights that are overwritten anyway.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = [f"{len(missing)} missing: {_short(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected: {_short(unexpected)}" if unexpected else ""]
        raise WeightsError(f"{source} does not match the model: " + "; ".join(p for p in parts if p))
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise WeightsError(
                f"{source}: tensor {key!r} has shape {tuple(state[key].shape)} in the checkpoint but the model "
                f"needs {tuple(tensor.shape)} (check the options: width, depth, heads, patch size, image size)"
            )
    on_meta = any(t.is_meta for t in expected.values())
    cast = {key: state[key].to(expected[key].dtype) for key in expected} if on_meta else state
    module.load_state_dict(cast, strict=True, assign=on_meta)
    still_meta = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if still_meta:  # a non-persistent buffer has no checkpoint entry to take its place
        raise WeightsError(f"{source}: {_short(still_meta)} still have no data after loading (built on 'meta')")


def _short(keys: Iterable[str], limit: int = 8) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def read_hf_directory(directory: Path, keep: Callable[[str], bool] = lambda key: True) -> StateDict:
    """Tensors of a transformers `save_pretrained` directory whose keys pass `keep`, reading only
    the shards that hold them (single file or sharded; safetensors or weights-only .bin)."""
    weights = next((directory / name for name in HF_WEIGHT_FILES if (directory / name).is_file()), None)
    if weights is None:
        raise WeightsError(f"{str(directory)!r} has no weights: expected one of {list(HF_WEIGHT_FILES)}")
    if not weights.name.endswith(".index.json"):
        return read_tensors(weights, keep)
    index = read_json(weights, "weights index", top=dict)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise WeightsError(f"weights index {str(weights)!r} has no 'weight_map' object (tensor name -> shard file); "
                           "expected the index that save_pretrained writes")
    state: StateDict = {}
    for shard in sorted({file for key, file in weight_map.items() if keep(key)}):
        state.update(read_tensors(require_path(directory / shard, "weights shard"), keep))
    return state


def load_subset(module: nn.Module, state: StateDict, source: str, expected: set[str]) -> list[str]:
    """Copy `state` into `module` where only the names in `expected` are required (e.g. the
    parameters one training stage updates). Anything in `state` the module lacks, a missing expected
    name, or a wrong shape is a WeightsError. Returns the module's names left as initialised."""
    own = module.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(expected - set(state))
    if missing or unexpected:
        parts = [f"{len(missing)} missing: {_short(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected: {_short(unexpected)}" if unexpected else ""]
        raise WeightsError(f"{source} does not match the model: " + "; ".join(p for p in parts if p))
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise WeightsError(f"{source}: tensor {key!r} has shape {tuple(tensor.shape)} in the file but {tuple(own[key].shape)} in the model")
    with torch.no_grad():
        for key, tensor in state.items():
            own[key].copy_(tensor.to(own[key].dtype))
    return sorted(set(own) - set(state))
