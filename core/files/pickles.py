"""torch's refusal of an unsafe pickle (weights_only=True), said in one sentence: torch's own message
is several paragraphs with terminal colour codes and advises loading the file unsafely."""

from __future__ import annotations

import re

_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def refused_pickle(exc: BaseException) -> str | None:
    """Why torch's weights_only loader refused a file, briefly; None for any other error."""
    if type(exc).__name__ != "UnpicklingError":
        return None
    found = _GLOBAL.search(_COLOUR.sub("", str(exc)))
    what = f"a pickled {found.group(1)!r}" if found else "pickled objects other than tensors"
    return (f"it holds {what}, which only unpickling (running code from the file) could load, and vlbridge reads "
            ".pth/.bin files with weights_only=True only")
