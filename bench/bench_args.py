"""Argument types the bench scripts share: a count below 1 (reps, batch, threads...) or an output
path that cannot be written is a usage error (argparse's exit 2) at once, not a traceback
(ZeroDivisionError, median of nothing, set_num_threads, open) after minutes of building models
and measuring."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable

from vlbridge.cli.argtypes import whole_number


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= `low` (the CLI's own rule)."""
    return whole_number(low)


def probability(text: str) -> float:
    """An argparse type: a float in [0, 1] (torch's dropout refuses others only at the first step)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1]; got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1]; got {value}")
    return value


def output_file(text: str) -> Path:
    """An argparse type: a file the results can be written to (missing folders are made then)."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    _check_writable(text, path.parent)
    return path


def output_folder(text: str) -> Path:
    """An argparse type: a folder that exists or can be made, and can be written to."""
    path = Path(text).expanduser()
    _check_writable(text, path)
    return path


def _check_writable(text: str, folder: Path) -> None:
    """`folder`, or the nearest part of it that exists, is a folder this process may write into."""
    folder = folder.absolute()
    while not folder.exists() and not folder.is_symlink():
        folder = folder.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: no permission to write in {folder}")


positive = at_least(1)
