"""Argument types the bench scripts share: a count below 1 (reps, batch, threads...) is a usage
error (argparse's exit 2) at once, not a traceback (ZeroDivisionError, median of nothing,
set_num_threads) after minutes of building models and measuring."""

from __future__ import annotations

import argparse


def at_least(low: int):
    """An argparse type: a whole number >= `low`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, at least {low}; got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}; got {value}")
        return value
    parse.__name__ = f"at least {low}"  # argparse names the type in its message
    return parse


def probability(text: str) -> float:
    """An argparse type: a float in [0, 1] (torch's dropout refuses others only at the first step)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1]; got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1]; got {value}")
    return value


positive = at_least(1)
