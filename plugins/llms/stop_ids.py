"""Where a generic causal LM stops generating, and what it pads finished rows with, as transformers does.

transformers' generate stops at any id of the model's `generation_config.eos_token_id`, read from the
folder's generation_config.json (else config.json): a list for many current models (Llama-3 instruct's
[128001, 128008, 128009], Qwen2 instruct's, Gemma's). A row that has finished is filled with the
generation config's pad_token_id, else with the first of those ids. vlbridge's caption end token (what
training appends) stops generation too; for the folders above it is one of the list already.
"""

from __future__ import annotations

from typing import Any

from vlbridge.errors import VLBridgeError


def as_id_list(value: Any, what: str) -> list[int]:
    """An eos_token_id setting (None, one id or a list of ids) as a list of ids; anything else is refused."""
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    bad = [v for v in values if not isinstance(v, int) or isinstance(v, bool) or v < 0]
    if bad:
        raise VLBridgeError(f"{what}: eos_token_id {value!r} holds {bad[0]!r}; it must be a token id (an int >= 0) or a list of them")
    return list(values)


def folder_stop_ids(model: Any) -> list[int]:
    """The ids transformers' generate stops at for `model` (its generation config's eos_token_id, all of them)."""
    config = getattr(model, "generation_config", None)
    return as_id_list(getattr(config, "eos_token_id", None), f"{type(model).__name__}'s generation config")


def stop_ids(model: Any, end_token_id: int | None) -> list[int]:
    """The folder's stop ids in their order, then the caption end token where the folder lacks it."""
    ids = folder_stop_ids(model)
    return ids + [end_token_id] if end_token_id is not None and end_token_id not in ids else ids


def finished_pad_id(model: Any, stops: list[int], fallback: int | None) -> int | None:
    """What transformers fills a finished row with: the generation config's pad_token_id, else the first stop id."""
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if pad is not None:
        return pad
    return stops[0] if stops else fallback
