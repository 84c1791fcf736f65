"""Printing helpers shared by the subcommands."""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from typing import Any, Iterator


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())


@contextlib.contextmanager
def plain_warnings(command: str) -> Iterator[None]:
    """vlbridge's own warnings (a plan's, a plugin's miscount, an untrained stage, an older feature cache, data)
    as `vlbridge CMD: warning: ...` lines, like its errors; Python's format named whatever frame raised
    them (a contextlib line) instead."""
    from vlbridge.errors import AssemblyWarning, CacheWarning, DataWarning, PluginWarning, UntrainedWarning

    with warnings.catch_warnings():  # restores showwarning afterwards
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 (warnings' signature)
            if issubclass(category, (AssemblyWarning, CacheWarning, DataWarning, PluginWarning, UntrainedWarning)):
                print(f"vlbridge {command}: warning: {message}", file=sys.stderr)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


@contextlib.contextmanager
def plan_listed() -> Iterator[None]:
    """Around a build by a command that prints the plan itself (validate --train): the plan lists its
    warnings, and the build's AssemblyWarning would say each a second time."""
    from vlbridge.errors import AssemblyWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AssemblyWarning)
        yield
