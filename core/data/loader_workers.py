"""What each DataLoader worker process sets up for itself when it starts (`worker_init_fn`)."""

from __future__ import annotations

import threading
from pathlib import PurePath
from types import TracebackType

_READER_GONE = (BrokenPipeError, ConnectionResetError, EOFError)
_SHARER = ("multiprocessing", "resource_sharer.py")  # the module whose thread hands tensors over by file descriptor


def quiet_when_reader_left(worker_id: int) -> None:
    """A loader process hands each batch's tensors to the process reading them by file descriptor,
    from a background thread of multiprocessing's resource sharer. When that reader stops (Ctrl-C or
    SIGTERM: a stopped `vlbridge compare` worker), the thread's send fails and Python printed its
    traceback on the user's terminal, amid the stop message. That failure, in that thread, says
    nothing now; every other thread's exceptions are reported as before."""
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is not None and issubclass(args.exc_type, _READER_GONE) and _raised_in_sharer(args.exc_traceback):
            return
        previous(args)

    threading.excepthook = hook


def _raised_in_sharer(trace: TracebackType | None) -> bool:
    while trace is not None:
        if PurePath(trace.tb_frame.f_code.co_filename).parts[-2:] == _SHARER:
            return True
        trace = trace.tb_next
    return False
