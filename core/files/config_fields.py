"""Numbers in user configs are numbers: pydantic's lax mode reads `true` as 1 for an int field (and
1.0 for a float), so `num_query_tokens: true`, `batch_size: yes` or `stage: true` (a Literal of
ints) would be taken as a count, and `lr: .inf` as a learning rate. A whole number past 64 bits
(`steps: 1000000000000000000000000000000`) is no count torch, numpy or a DataLoader can hold: it
validated and failed later, deep in a run. Every config model of vlbridge inherits these refusals
from `StrictNumbers`; a field that accepts a bool says so in its type."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Annotated, Any, Iterable

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo, field_validator

MAX_INT = 2**63 - 1  # the largest whole number a config may hold: int64, what torch and numpy count in
MAX_SEED = MAX_INT  # torch.manual_seed takes at most 2**64 - 1, and a rank's seed is seed + rank


NAME_MAX = 255  # bytes in one file or folder name (ext4, APFS, NTFS): a longer one made Path.exists raise


def unusable_path(value: str, *, name_lengths: bool = True) -> str | None:
    """Why no file system can take `value` as a path (a NUL byte, a name past NAME_MAX bytes), or None.
    `name_lengths=False` for a string that may name no file (a URL, whose '/' parts are not names)."""
    if "\0" in value:
        return f"{value!r} holds a NUL byte (\\0), which no path can; give the path without it"
    if not name_lengths:
        return None
    long = next((name for name in value.replace("\\", "/").split("/") if len(name.encode()) > NAME_MAX), None)
    if long is not None:
        return (f"the name {long[:40]!r}... is {len(long.encode())} bytes, longer than a file or folder name may be "
                f"({NAME_MAX}); give a shorter path")
    return None


def _path_text(value: str) -> str:
    problem = unusable_path(value)
    if problem:
        raise ValueError(problem)
    return value


PathText = Annotated[str, AfterValidator(_path_text)]
"""A config string read as a path: refused at validation, with its YAML path, when no file system could
hold it (Path.exists raised OSError for a name past 255 bytes; a NUL byte failed when a run made its folder)."""


def listed_once(values: list | None, what: str) -> list | None:
    """`values` as given; a ValueError naming the list when an item is in it twice (`what`: one item)."""
    if values is not None and len(set(values)) != len(values):
        raise ValueError(f"list each {what} once, got {values}")
    return values


def did_you_mean(key: Any, valid: Iterable[str]) -> str:
    """'; did you mean 'batch_size'?' for an unknown key close to a valid one (a typo), else ''; the
    list of every valid key alone leaves the reader to find the one they meant."""
    close = difflib.get_close_matches(str(key), list(valid), n=2, cutoff=0.7)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _accepts(annotation: Any) -> set[type]:
    """The plain types an annotation admits, through Optional/Union/Annotated/list (list items included)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _accepts(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_accepts(arg) for arg in typing.get_args(annotation)))
    if origin in (list, tuple, set, frozenset):
        return set().union(*(_accepts(arg) for arg in typing.get_args(annotation) if arg is not Ellipsis))
    if origin is typing.Literal:  # Literal[1, 2] takes ints (and True == 1 would pass it), Literal["a"] strings
        return {type(arg) for arg in typing.get_args(annotation)}
    return {annotation} if isinstance(annotation, type) else set()


def _items(value: Any) -> tuple[Any, ...]:
    """The value, or a list's or tuple's items (a field's list of numbers)."""
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _too_big(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT


class StrictNumbers(BaseModel):
    """Refuse true/false given to a number field (int, float or a Literal of them, without bool in its
    type), a whole number past int64 given to an int field, and an infinite or NaN float
    (subclasses' model_config merges with this one)."""

    model_config = ConfigDict(allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _plain_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        has_bool = any(isinstance(item, bool) for item in _items(value))
        if info.field_name is None or not (has_bool or _too_big(value)):
            return value
        accepted = _accepts(cls.model_fields[info.field_name].annotation)
        if has_bool and bool not in accepted and accepted & {int, float}:
            raise ValueError(f"expected a number, got {value!r} (true/false is not a count or a size)")
        if _too_big(value) and int in accepted:  # worded as pydantic words a bound (a list's items keep theirs: seeds.1)
            bound = f"less than or equal to {MAX_INT}" if value > 0 else f"greater than or equal to {-MAX_INT}"
            raise ValueError(f"Input should be {bound}, int64's limit: a whole number torch and numpy can hold (got {value:.3g})")
        return value
