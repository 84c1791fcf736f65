"""Shared fixtures. In-process tests see the built-in plugins only: third-party plugins that happen
to be installed must not change results (tests that want them install into a throw-away venv)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    os.environ["VLBRIDGE_LOAD_PLUGINS"] = ""
    os.environ.pop("VLBRIDGE_STRICT_PLUGINS", None)
    os.environ.pop("VLBRIDGE_DISABLE_PLUGINS", None)


@pytest.fixture(autouse=True)
def _fresh_registry():
    from vlbridge.plugin.registry import invalidate

    invalidate()
    yield
    invalidate()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one thread is faster than thread hand-offs, immune to other processes on a busy
    2-core machine, and gives numbers that do not depend on the thread count. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def repo() -> Path:
    return REPO
