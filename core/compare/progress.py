"""The comparison's overall progress bar: one line per phase (train a stage, evaluate a run) with
the share of the expected work done, the time spent and an estimate of the time left.

A phase's weight is a rough cost in stage-2 optimizer steps, so the estimate follows the steps
rather than the count of phases (a stage-1 step runs ITC, ITM on 3x the batch, and ITG).
"""

from __future__ import annotations

import time
from typing import Callable

from vlbridge.compare.config import CompareConfig

STAGE1_STEP_WEIGHT = 3.0
EVAL_WEIGHT = 40.0  # per evaluation split: captioning, VQA and retrieval of a few hundred images


def phase_plan(config: CompareConfig, stage1_trainers: set[tuple[str, int]] | None = None) -> list[tuple[str, float]]:
    """Every phase the comparison will go through, in order, with its weight; a stage 1 that runs
    share counts once, for the (run, seed) in `stage1_trainers` (default: every run with one)."""
    phases = []
    for seed in config.seeds:
        for run in config.runs:
            if run.stage1_steps and (stage1_trainers is None or (run.name, seed) in stage1_trainers):
                phases.append((f"{run.name} seed {seed}: stage 1", STAGE1_STEP_WEIGHT * run.stage1_steps))
            if run.stage2_steps:
                phases.append((f"{run.name} seed {seed}: stage 2", float(run.stage2_steps)))
            phases.append((f"{run.name} seed {seed}: evaluate", EVAL_WEIGHT * max(1, len(config.evals))))
    return phases


class PhaseProgress:
    """Prints `[demo ####......  34%] 2:10 spent, ~4:12 left · <phase>` as each phase starts.

    Worker processes run phases side by side: each is a `lane` with its own current phase."""

    def __init__(self, phases: list[tuple[str, float]], say: Callable[[str], None], label: str = "progress", width: int = 24):
        self.weights = dict(phases)
        self.total = sum(self.weights.values()) or 1.0
        self.done = 0.0
        self.current: dict[int, str] = {}
        self.say, self.label, self.width = say, label, width
        self.started = time.monotonic()

    def start(self, phase: str, lane: int = 0) -> None:
        """Close the lane's running phase (its weight counts as done) and announce `phase`."""
        self.finish(lane)
        self.current[lane] = phase
        self.say(self.line(phase))

    def skip(self, run: str, seed: int, lane: int = 0) -> None:
        """A run whose results were stored earlier: its phases are done already."""
        self.finish(lane)
        prefix = f"{run} seed {seed}: "
        self.done += sum(w for name, w in self.weights.items() if name.startswith(prefix))

    def finish(self, lane: int | None = None) -> None:
        """Count the lane's running phase (every lane's, without one) as done."""
        for key in list(self.current) if lane is None else [lane]:
            phase = self.current.pop(key, None)
            if phase is not None:
                self.done += self.weights.get(phase, 0.0)

    def line(self, phase: str) -> str:
        share = min(1.0, self.done / self.total)
        spent = time.monotonic() - self.started
        if share >= 1.0:
            left = ""
        else:
            left = f", ~{_clock(spent * (1 - share) / share)} left" if share > 0.02 else ", estimating time left"
        bar = "#" * int(share * self.width) + "." * (self.width - int(share * self.width))
        return f"[{self.label} {bar} {100 * share:3.0f}%] {_clock(spent)} spent{left} · {phase}"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"
