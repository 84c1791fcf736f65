"""A DataLoader worker whose reader has stopped (a stopped `vlbridge compare` worker) printed the
traceback of multiprocessing's resource-sharer thread, whose send then fails, on the user's terminal."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import pytest

from vlbridge.data.loader_workers import quiet_when_reader_left


def _raising_in(filename: str, error: BaseException):
    namespace: dict = {}
    exec(compile("def serve():\n    raise error\n", filename, "exec"), {"error": error}, namespace)
    return namespace["serve"]


@pytest.mark.parametrize("module, error, said", [
    ("resource_sharer.py", BrokenPipeError(32, "Broken pipe"), False),
    ("resource_sharer.py", ConnectionResetError(104, "Connection reset by peer"), False),
    ("resource_sharer.py", ValueError("a real bug"), True),
    ("connection.py", BrokenPipeError(32, "Broken pipe"), True),
])
def test_only_the_sharers_failure_to_reach_a_stopped_reader_is_silent(module, error, said, monkeypatch, capsys):
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
    quiet_when_reader_left(0)
    thread = threading.Thread(target=_raising_in(str(Path(multiprocessing.__file__).parent / module), error))
    thread.start()
    thread.join()
    err = capsys.readouterr().err
    assert ("Traceback" in err and type(error).__name__ in err) == said, err


class Numbers(list):
    shuffle = False


def test_loaders_with_worker_processes_install_it():
    from vlbridge.data.build import make_loader

    assert make_loader(Numbers(range(4)), batch_size=2, num_workers=1).worker_init_fn is quiet_when_reader_left
    assert make_loader(Numbers(range(4)), batch_size=2).worker_init_fn is None
