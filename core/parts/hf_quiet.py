"""Silence transformers' and huggingface_hub's progress bars and info logging while vlbridge works.

vlbridge's output is vlbridge's: a "Loading weights" or "Writing model shards" bar in the middle of
a demo or an export says nothing the user asked about. Used as a library, vlbridge must not change
the caller's settings for good, so `quiet_hf()` is a context (and decorator) that puts every setting
back as it found it, nested uses included.

Torch-free and transformers-free on entry: huggingface_hub's switch is set at once (transformers
reads it when it is first imported), transformers' own switches only if it is imported already;
a transformers imported inside the block starts at error verbosity (its TRANSFORMERS_VERBOSITY is
set for the block) and is put back to its defaults on exit.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

VERBOSITY_VARIABLE = "TRANSFORMERS_VERBOSITY"


@contextmanager
def quiet_hf() -> Iterator[None]:
    """Within the block: no transformers / huggingface_hub progress bars, transformers logs errors only."""
    hub = _hub_state()
    library = sys.modules.get("transformers.utils.logging")
    before = (library.is_progress_bar_enabled(), library.get_verbosity()) if library is not None else None
    variable = os.environ.get(VERBOSITY_VARIABLE)
    if hub is not None:
        hub["module"].disable_progress_bars()
    if library is not None:
        if hub is not None:
            library.disable_progress_bar()
        library.set_verbosity_error()
    else:
        os.environ[VERBOSITY_VARIABLE] = "error"
    try:
        yield
    finally:
        _restore_variable(variable)
        library = sys.modules.get("transformers.utils.logging")
        if library is not None:  # imported before or within the block: back to what it was, or to its defaults
            enabled, verbosity = before if before is not None else (_hub_bars_were_on(hub), _default_verbosity(library))
            if hub is not None:
                (library.enable_progress_bar if enabled else library.disable_progress_bar)()
            library.set_verbosity(verbosity)
        if hub is not None:  # last: transformers' switches set hub's global state too
            hub["states"].clear()
            hub["states"].update(hub["saved"])


def _hub_state() -> dict[str, Any] | None:
    """huggingface_hub's progress-bar table and a copy of it; None where hub is missing or the user
    forces bars on (HF_HUB_DISABLE_PROGRESS_BARS=0: then both libraries keep their bars)."""
    try:
        from huggingface_hub import constants

        hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")  # the module (the package exports a class of that name)
    except ImportError:
        return None
    if constants.HF_HUB_DISABLE_PROGRESS_BARS is False:
        return None
    states = hub_tqdm.progress_bar_states
    return {"module": hub_tqdm, "states": states, "saved": dict(states)}


def _hub_bars_were_on(hub: dict[str, Any] | None) -> bool:
    return hub is None or hub["saved"].get("_global", True)


def _default_verbosity(library: Any) -> int:
    """transformers' verbosity as its import would set it: from TRANSFORMERS_VERBOSITY, else warning."""
    name = os.environ.get(VERBOSITY_VARIABLE)
    return library.get_log_levels_dict().get(name, logging.WARNING) if name else logging.WARNING


def _restore_variable(value: str | None) -> None:
    if value is None:
        os.environ.pop(VERBOSITY_VARIABLE, None)
    else:
        os.environ[VERBOSITY_VARIABLE] = value
