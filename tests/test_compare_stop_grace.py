"""`stop_workers` gives all stopped workers one grace period side by side: waited out worker by
worker, two workers stuck in their unwinding made the stop take twice STOP_GRACE_S before either was
killed (and a user's Ctrl-C twice as long to end)."""

from __future__ import annotations

import time

import pytest

from vlbridge.compare import workers as compare_workers


class StuckWorker:
    """A worker process that never ends on SIGTERM: join() waits out its whole timeout."""

    def __init__(self) -> None:
        self.alive, self.terminated, self.killed = True, False, False

    def is_alive(self) -> bool:
        return self.alive

    def terminate(self) -> None:
        self.terminated = True

    def kill(self) -> None:
        self.killed, self.alive = True, False

    def join(self, timeout: float | None = None) -> None:
        if self.alive and timeout:
            time.sleep(timeout)


class EndingWorker(StuckWorker):
    def terminate(self) -> None:
        self.terminated, self.alive = True, False


def test_stuck_workers_share_one_grace_period_then_are_killed(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(compare_workers, "STOP_GRACE_S", 0.4)
    workers = [StuckWorker(), EndingWorker(), StuckWorker()]
    started = time.monotonic()
    compare_workers.stop_workers(workers)
    elapsed = time.monotonic() - started
    assert all(w.terminated for w in workers) and not any(w.is_alive() for w in workers)
    assert [w.killed for w in workers] == [True, False, True]
    assert 0.4 <= elapsed < 0.75, elapsed  # one grace period, not one per stuck worker (0.8)
