"""Numbers in user configs are numbers: pydantic's lax mode reads `true` as 1 for an int field (and
1.0 for a float), so `num_query_tokens: true` or `batch_size: yes` would be taken as a count, and
`lr: .inf` as a learning rate. Every config model of vlbridge inherits both refusals from
`StrictNumbers`; a field that accepts a bool says so in its type."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any, Iterable

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

MAX_SEED = 2**63 - 1  # torch.manual_seed takes at most 2**64 - 1, and a rank's seed is seed + rank


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
    return {annotation} if isinstance(annotation, type) else set()


def _has_bool(value: Any) -> bool:
    return isinstance(value, bool) or (isinstance(value, (list, tuple)) and any(isinstance(item, bool) for item in value))


class StrictNumbers(BaseModel):
    """Refuse true/false given to a number field (int or float without bool in its type), and an
    infinite or NaN float (subclasses' model_config merges with this one)."""

    model_config = ConfigDict(allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name is None or not _has_bool(value):
            return value
        accepted = _accepts(cls.model_fields[info.field_name].annotation)
        if bool not in accepted and accepted & {int, float}:
            raise ValueError(f"expected a number, got {value!r} (true/false is not a count or a size)")
        return value
