"""Nested state (a trainer's optimizer, scheduler, GradScaler and RNG states) as one safetensors file,
so that resuming a run never unpickles anything, not even with weights_only.

Every tensor becomes a tensor of the file, named by where it sits ("optimizer/state/0/exp_avg").
Everything else is a JSON skeleton in the file's metadata that names those tensors. JSON alone would
lose two things the consumers need, so the skeleton tags them: tuples stay tuples (random.setstate
takes nothing else) and dict keys keep their type (an optimizer's state is keyed by int parameter
index, a data position by str). A node of the skeleton is a JSON null, bool, number, string or array
(a list), or an object of one tag: {"tuple": [...]}, {"dict": [[key, value], ...]}, {"tensor": name}.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlbridge.errors import WeightsError

SKELETON = "vlbridge.skeleton"  # the metadata entry holding the skeleton; the caller's header has the others


# -- writing -----------------------------------------------------------------------------------
def write_state(path: str | Path, state: Any, header: Mapping[str, str]) -> None:
    """Write `state` to `path` (not atomically: wrap in files.atomic.atomic_write), with the
    caller's `header` (its format and version, readable without decoding) beside the skeleton."""
    if SKELETON in header:
        raise ValueError(f"header entry {SKELETON!r} is the skeleton's own")
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(state, "", tensors, set())
    save_file(tensors, str(path), metadata={**header, SKELETON: json.dumps(skeleton)})


def _encode(value: Any, where: str, tensors: dict[str, torch.Tensor], storages: set[int]) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        name = _unused(where or "tensor", tensors)
        tensors[name] = _owned(value, where, storages)
        return {"tensor": name}
    if isinstance(value, (list, tuple)):
        items = [_encode(item, _child(where, i), tensors, storages) for i, item in enumerate(value)]
        return {"tuple": items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        pairs = []
        for key, item in value.items():
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise TypeError(f"cannot write {where or 'the state'}: key {key!r} is a {type(key).__name__}; "
                                "a state file keeps dict keys that are str or int")
            pairs.append([key, _encode(item, _child(where, key), tensors, storages)])
        return {"dict": pairs}
    raise TypeError(f"cannot write {where or 'the state'}: a {type(value).__name__}; a state file keeps tensors, "
                    "None, bools, ints, floats, strings, and lists, tuples and dicts of them")


def _child(where: str, key: str | int) -> str:
    return f"{where}/{key}" if where else str(key)


def _unused(name: str, taken: Mapping[str, Any]) -> str:
    """`name`, or `name#n` where a key holding '/' (or an int key beside its str twin) made it twice."""
    count, unique = 1, name
    while unique in taken:
        unique, count = f"{name}#{count}", count + 1
    return unique


def _owned(tensor: torch.Tensor, where: str, storages: set[int]) -> torch.Tensor:
    """The tensor on the CPU, contiguous and alone in its storage: safetensors refuses views of
    one storage (optimizer moments can be views of a flat buffer) and non-contiguous tensors."""
    plain = tensor.detach()
    if type(plain) is not torch.Tensor:  # a DTensor's local shard, a fake tensor: not the whole value
        raise TypeError(f"cannot write {where}: a {type(tensor).__name__}; a state file keeps whole, plain tensors")
    plain = plain.cpu()
    if plain.numel() == 0:  # empty storages all sit at address 0 and share nothing
        return plain.contiguous()
    storage = plain.untyped_storage()
    whole = plain.is_contiguous() and plain.storage_offset() == 0 and storage.nbytes() == plain.numel() * plain.element_size()
    if not whole or storage.data_ptr() in storages:
        plain = plain.clone(memory_format=torch.contiguous_format)
    storages.add(plain.untyped_storage().data_ptr())
    return plain


# -- reading -----------------------------------------------------------------------------------
def read_header(path: str | Path) -> dict[str, str]:
    """The header `write_state` stored (without the skeleton), to check a format and version
    before decoding what a newer layout may have changed."""
    with _opened(Path(path)) as file:
        header = dict(file.metadata() or {})
    header.pop(SKELETON, None)
    return header


def read_state(path: str | Path) -> Any:
    """The state `write_state` wrote: tensors on the CPU, tuples and int keys as they were."""
    path = Path(path)
    with _opened(path) as file:
        raw = (file.metadata() or {}).get(SKELETON)
        if raw is None:
            raise WeightsError(f"{path} holds no {SKELETON!r} metadata, so it is not a state file vlbridge wrote "
                               "(a trainer_state.safetensors of a training checkpoint)")
        try:
            skeleton = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise WeightsError(f"{path}: its {SKELETON!r} metadata is not JSON ({exc}); the file was damaged or edited") from exc
        return _decode(skeleton, file, set(file.keys()), path)


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[Any]:
    try:
        file = safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise WeightsError(f"cannot read {path} ({exc}): it is truncated or damaged, or not a safetensors file") from exc
    with file:
        yield file


def _decode(node: Any, file: Any, names: set[str], path: Path) -> Any:
    if isinstance(node, list):
        return [_decode(item, file, names, path) for item in node]
    if not isinstance(node, dict):
        return node
    tag, body = next(iter(node.items())) if len(node) == 1 else (None, None)
    if tag == "tensor" and isinstance(body, str):
        if body not in names:
            raise WeightsError(f"{path}: its skeleton names tensor {body!r}, which the file lacks; the file was damaged or edited")
        return file.get_tensor(body)
    if tag == "tuple" and isinstance(body, list):
        return tuple(_decode(item, file, names, path) for item in body)
    if tag == "dict" and isinstance(body, list) and all(_is_pair(pair) for pair in body):
        return {key: _decode(value, file, names, path) for key, value in body}
    raise WeightsError(f"{path}: its skeleton holds {json.dumps(node)[:80]}, which is no node this vlbridge reads "
                       "(a newer vlbridge wrote it, or it was edited)")


def _is_pair(pair: Any) -> bool:
    return (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], (str, int))
            and not isinstance(pair[0], bool))
