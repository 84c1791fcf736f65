"""How a run is stopped from outside: SIGTERM (how SLURM, Kubernetes, torchrun and `vlbridge compare`
stop a process) ends it as Ctrl-C does, so that its `finally` blocks and its data loaders' shutdown
run. Python's default for SIGTERM is to die at once, without a word and without unwinding."""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run stands, so that it ends as Ctrl-C does."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated`: the run's `finally` blocks release its lock, remove a
    half-written checkpoint and stop its loaders' worker processes."""
    def stop(signum: int, frame: object) -> None:
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (a caller embedding the CLI): its handling is the caller's
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stopped_by(exc: KeyboardInterrupt) -> tuple[str, int]:
    """How a stopped run says it stopped, and its exit status: 128 + the signal, as a shell reports it."""
    if isinstance(exc, Terminated):
        return "terminated (SIGTERM)", 128 + signal.SIGTERM
    return "interrupted", 128 + signal.SIGINT
