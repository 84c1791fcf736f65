"""Reading JSON and JSONL annotation files with errors that point at the file, line and field."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from vlbridge.files import userfiles
from vlbridge.data.records import DataError
from vlbridge.errors import InputFileError


@contextmanager
def _as_data_error() -> Iterator[None]:
    """A file problem found by vlbridge.files.userfiles, raised as the data layer's DataError."""
    try:
        yield
    except InputFileError as exc:
        raise DataError(str(exc)) from exc


def check_file(path: str | os.PathLike, what: str) -> Path:
    """The path, if it is an existing file; else a DataError saying what was expected there."""
    with _as_data_error():
        return userfiles.check_file(path, what)


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Parse a whole JSON file; malformed JSON is reported with its line and column."""
    with _as_data_error():
        return userfiles.read_json(path, what)


def iter_jsonl(path: str | os.PathLike, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; every line must be one JSON object."""
    path = check_file(path, what)
    offset = 0
    with path.open("rb") as handle:  # bytes, so a bad encoding is reported by line and byte offset
        for number, raw in enumerate(handle, start=1):
            with _as_data_error():
                line = userfiles.decode(raw, path, what, "JSONL", offset, f"line {number}")
            offset += len(raw)
            if not line.strip():
                continue
            try:
                value = json.loads(line, object_pairs_hook=_unique_keys)
            except json.JSONDecodeError as exc:
                raise DataError(f"{what} {str(path)!r}, line {number}: malformed JSON at column {exc.colno}: {exc.msg}") from exc
            except _DuplicateKey as exc:
                raise DataError(f"{what} {str(path)!r}, line {number}: the field {exc.args[0]!r} appears twice; JSON keeps only "
                                "the last, so one of the two values would be lost: keep one") from None
            if not isinstance(value, dict):
                raise DataError(f"{what} {str(path)!r}, line {number}: expected a JSON object, got {type(value).__name__}")
            yield number, value


class _DuplicateKey(ValueError):
    """A JSONL object naming one field twice (the standard parser silently keeps the last)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise _DuplicateKey(key)
        found[key] = value
    return found


def require(record: Any, name: str, types: type | tuple[type, ...], where: str) -> Any:
    """`record[name]`, checked for presence and type; errors name the field and the record."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if name not in record:
        present = ", ".join(repr(k) for k in list(record)[:12]) or "none"
        raise DataError(f"{where}: missing required field {name!r} (fields present: {present})")
    value = record[name]
    if not _is_instance(value, types):
        raise DataError(f"{where}: field {name!r} must be {_type_names(types)}, got {type(value).__name__} {value!r:.60}")
    return value


def require_text(record: Any, name: str, where: str, value: Any = None) -> str:
    """`record[name]` (or `value`, an item of that field's list) as a string with words in it: a blank
    caption or question would train on, or be scored against, nothing at all."""
    text = require(record, name, str, where) if value is None else value
    if not text.strip():
        raise DataError(f"{where}: field {name!r} is {'empty' if not text else 'blank'} ({text!r}); give the text, or drop the record")
    return text


def optional(record: dict[str, Any], name: str, types: type | tuple[type, ...], where: str, default: Any = None) -> Any:
    """`record[name]` if present (and not null), type-checked; else the default."""
    if record.get(name) is None:
        return default
    return require(record, name, types, where)


def require_list(data: Any, key: str, path: str | os.PathLike, what: str) -> list[Any]:
    """`data[key]` as a list, where `data` is the top-level object of a JSON file."""
    if not isinstance(data, dict) or key not in data:
        found = f"keys {sorted(data)[:8]}" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise DataError(f"{what} {str(path)!r}: expected an object with a {key!r} list, found {found}")
    if not isinstance(data[key], list):
        raise DataError(f"{what} {str(path)!r}: {key!r} must be a list, got {type(data[key]).__name__}")
    return data[key]


def resolve_image(value: str, image_root: str | os.PathLike | None, base: Path) -> str:
    """An image path from an annotation: absolute as is, relative to the image root or else `base`."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    return str(Path(image_root).expanduser() / path if image_root is not None else base / path)


def _is_instance(value: Any, types: type | tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        return False  # JSON true/false is not an id or a count
    return isinstance(value, types)


def _type_names(types: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", list: "a list", dict: "an object", float: "a number"}
    items = types if isinstance(types, tuple) else (types,)
    return " or ".join(names.get(t, t.__name__) for t in items)
