"""What a training run tells its user: a progress bar on stderr, `metrics.jsonl`, and TensorBoard
events when `torch.utils.tensorboard` is importable. Only rank 0 makes these; other ranks get
`Silent` stand-ins so the loop never asks who it is.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from vlbridge.files.atomic import atomic_write_text

METRICS_FILE = "metrics.jsonl"


class ProgressBar:
    """One line redrawn in place on a terminal; one printed line per `show` call otherwise (logs)."""

    def __init__(self, total: int, start: int = 0, stream: TextIO | None = None, width: int = 24):
        self.total, self.step, self.width = total, start, width
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started, self.start_step = time.monotonic(), start
        self.fields: dict[str, str] = {}
        self._drawn = 0.0

    def update(self, step: int, **fields: float) -> None:
        """Advance to `step`; keep the newest values of the fields shown (loss, lr, img/s)."""
        self.step = step
        self.fields.update({name: _short(value) for name, value in fields.items()})
        if self.tty and (time.monotonic() - self._drawn > 0.1 or step >= self.total):
            self._draw()

    def show(self) -> None:
        """A log point: redraw on a terminal, print a full line elsewhere."""
        if self.tty:
            self._draw()
        else:
            print(self._line(), file=self.stream, flush=True)

    def write(self, message: str) -> None:
        """Print a message above the bar."""
        if self.tty:
            self.stream.write("\r\x1b[2K")
        print(message, file=self.stream, flush=True)
        if self.tty and self._drawn:
            self._draw()

    def close(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self) -> None:
        self.stream.write("\r\x1b[2K" + self._line())
        self.stream.flush()
        self._drawn = time.monotonic()

    def _line(self) -> str:
        done = min(1.0, self.step / max(1, self.total))
        filled = int(done * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        rate = (self.step - self.start_step) / max(1e-9, time.monotonic() - self.started)
        eta = (self.total - self.step) / rate if rate > 0 else math.inf
        fields = " ".join(f"{name} {value}" for name, value in self.fields.items())
        return f"[{bar}] {self.step}/{self.total} {fields} eta {_duration(eta)}".rstrip()


def _short(value: float) -> str:
    if isinstance(value, float) and (abs(value) < 1e-3 or abs(value) >= 1e4) and value != 0:
        return f"{value:.2e}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl, and mirrors numbers to TensorBoard."""

    def __init__(self, output_dir: str | Path, tensorboard: bool = True):
        self.path = Path(output_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tensorboard = tensorboard
        self.board: Any = None  # the SummaryWriter, opened at the first record (after set_aside)

    def set_aside(self) -> Path | None:
        """A fresh run's metrics start empty: lines an earlier run left here (one stopped before its
        first checkpoint, so nothing resumes it) move to metrics.before-<time>.jsonl, and its
        tensorboard/ folder beside it, never deleted; returns where the lines went."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return None
        stamp = f"before-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        kept = self.path.with_name(f"metrics.{stamp}.jsonl")
        os.replace(self.path, kept)
        board = self.path.parent / "tensorboard"
        if board.is_dir():  # its events would plot the earlier run's steps among these
            os.replace(board, board.with_name(f"tensorboard.{stamp}"))
        return kept

    def truncate_after(self, step: int) -> None:
        """On resume: forget lines a killed run wrote after the checkpoint it resumes from."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines() if _step_of(line) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def append(self, record: dict[str, Any], prefix: str = "train") -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tensorboard and self.board is None:
            self.board = _summary_writer(self.path.parent / "tensorboard")
            self.tensorboard = self.board is not None  # tensorboard not installed: asked once
        if self.board is not None:
            for name, value in record.items():
                if isinstance(value, (int, float)) and name not in ("step", "epoch"):
                    self.board.add_scalar(f"{prefix}/{name}", value, record["step"])

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def _step_of(line: str) -> float:
    """The step a metrics line is about; a line cut short by a kill counts as after any step."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def _summary_writer(path: Path) -> Any:
    """A TensorBoard SummaryWriter, or None when tensorboard is not installed (it is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


class Silent:
    """Stands in for the bar and the metrics log on ranks other than 0."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class StepReporter(Silent):
    """A quiet run's bar: draws nothing, only tells the caller each step reached (its own progress line)."""

    def __init__(self, on_step: Callable[[int], None]) -> None:
        self.on_step = on_step

    def update(self, step: int, **fields: float) -> None:
        self.on_step(step)
