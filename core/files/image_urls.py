"""A URL given where an image file is wanted, told apart from a missing file (torch-free, so the CLI can
check its image arguments before torch loads). vlbridge never downloads images."""

from __future__ import annotations

import re

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def url_problem(path: object) -> str | None:
    """The message for a URL given as an image, or None for anything else."""
    if isinstance(path, str) and _URL.match(path):
        return (f"{path!r} is a URL; vlbridge reads local image files only (it never downloads): "
                "download it first and pass the file's path, or open it as a PIL image")
    return None
