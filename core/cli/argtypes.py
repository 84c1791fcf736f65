"""argparse types for counts: a value out of range is a usage error (exit 2, with the flag named by
argparse) before anything loads, not a failure deep inside a run."""

from __future__ import annotations

import argparse
from typing import Callable

from vlbridge.files.config_fields import MAX_SEED


def _count(text: str, least: int, most: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} is less than {least}")
    if most is not None and value > most:
        raise argparse.ArgumentTypeError(f"{value} is more than {most}")
    return value


def whole_number(least: int, most: int | None = None) -> Callable[[str], int]:
    """An argparse type for a whole number from `least` (to `most`), for scripts beside the CLI (bench/)."""
    bound = f"at least {least}" if most is None else f"from {least} to {most}"

    def parse(text: str) -> int:
        try:
            return _count(text, least, most)
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{exc}: give a whole number {bound}") from None
    parse.__name__ = f"whole number {bound}"  # argparse names it
    return parse


def positive_int(text: str) -> int:
    """A whole number >= 1 (a count of beams, tokens, results, images)."""
    return _count(text, 1)


def non_negative_int(text: str) -> int:
    """A whole number >= 0 (a minimum, a number of worker processes)."""
    return _count(text, 0)


def seed(text: str) -> int:
    """A random seed: a whole number from 0 to MAX_SEED (torch seeds from 64 bits)."""
    return _count(text, 0, MAX_SEED)
