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


STEP_WEIGHTS = {"stage 1": STAGE1_STEP_WEIGHT, "stage 2": 1.0}  # a phase kind's weight per optimizer step
PRINT_EVERY = 60.0  # seconds between the progress lines printed during a phase


def _kind(phase: str) -> str:
    """'stage 1', 'stage 2' or 'evaluate': what follows the last ': ' of a phase name."""
    return phase.rpartition(": ")[2]


class PhaseProgress:
    """Prints `[demo ####......  34%] 2:10 spent, ~4:12 left · <phase>` as each phase starts, and
    every PRINT_EVERY seconds while training reports steps (`step`).

    The time left comes from measured rates: seconds per weight unit of each phase kind (stage-1
    steps, stage-2 steps, evaluations), timed separately. A kind not timed yet borrows the measured
    kinds' rate through the weights, which are guesses, so that estimate is printed as rough.
    Worker processes run phases side by side: each is a `lane` with its own current phase."""

    def __init__(self, phases: list[tuple[str, float]], say: Callable[[str], None], label: str = "progress", width: int = 24,
                 clock: Callable[[], float] = time.monotonic):
        self.weights = dict(phases)
        self.total = sum(self.weights.values()) or 1.0
        self.done = 0.0
        self.closed: set[str] = set()
        self.current: dict[int, str] = {}
        self.partial: dict[int, float] = {}  # lane -> weight done of its running phase
        self.ticks: dict[int, tuple[float, int]] = {}  # lane -> (time, step) of its phase's last step report
        self.began: dict[int, float] = {}  # lane -> when its running phase started
        self.timed: dict[str, list[float]] = {}  # kind -> [seconds, weight] measured
        self.say, self.label, self.width, self.clock = say, label, width, clock
        self.started = self.printed = clock()

    def start(self, phase: str, lane: int = 0) -> None:
        """Close the lane's running phase (its weight counts as done) and announce `phase`."""
        self.finish(lane)
        self.current[lane], self.began[lane] = phase, self.clock()
        self.printed = self.began[lane]
        self.say(self.line(phase))

    def step(self, step: int, lane: int = 0) -> None:
        """The lane's training reached `step`: time the steps since its last report (the first report
        only sets the mark: the time before it went to building and loading) and now and then print."""
        phase = self.current.get(lane)
        if phase is None or _kind(phase) not in STEP_WEIGHTS:
            return
        now, per_step = self.clock(), STEP_WEIGHTS[_kind(phase)]
        if lane in self.ticks and step > self.ticks[lane][1]:
            timed = self.timed.setdefault(_kind(phase), [0.0, 0.0])
            timed[0] += now - self.ticks[lane][0]
            timed[1] += (step - self.ticks[lane][1]) * per_step
        self.ticks[lane] = (now, step)
        self.partial[lane] = min(step * per_step, self.weights.get(phase, 0.0))
        if now - self.printed >= PRINT_EVERY:
            self.printed = now
            self.say(self.line(phase))

    def skip(self, run: str, seed: int, lane: int = 0) -> None:
        """A run whose results were stored earlier: its phases are done already."""
        self.finish(lane)
        prefix = f"{run} seed {seed}: "
        for name, weight in self.weights.items():
            if name.startswith(prefix) and name not in self.closed:
                self.closed.add(name)
                self.done += weight

    def finish(self, lane: int | None = None) -> None:
        """Count the lane's running phase (every lane's, without one) as done; an evaluation's time is measured."""
        for key in list(self.current) if lane is None else [lane]:
            phase = self.current.pop(key, None)
            self.partial.pop(key, None)
            self.ticks.pop(key, None)
            began = self.began.pop(key, None)
            if phase is None or phase in self.closed:
                continue
            self.closed.add(phase)
            self.done += self.weights.get(phase, 0.0)
            if _kind(phase) not in STEP_WEIGHTS and began is not None and self.weights.get(phase):
                timed = self.timed.setdefault(_kind(phase), [0.0, 0.0])
                timed[0] += self.clock() - began
                timed[1] += self.weights[phase]

    def time_left(self) -> tuple[float, bool] | None:
        """(seconds left, rough?) from the measured rates; None before any rate is measured."""
        rates = {kind: seconds / weight for kind, (seconds, weight) in self.timed.items() if weight > 0}
        if not rates:
            return None
        fallback = sum(s for s, _ in self.timed.values()) / sum(w for _, w in self.timed.values())
        seconds, rough = 0.0, False
        for name, weight in self.weights.items():
            if name in self.closed:
                continue
            left = weight - sum(w for lane, w in self.partial.items() if self.current.get(lane) == name)
            rough |= left > 0 and _kind(name) not in rates
            seconds += max(0.0, left) * rates.get(_kind(name), fallback)
        return seconds / max(1, len(self.current)), rough  # lanes run side by side

    def line(self, phase: str) -> str:
        share = min(1.0, (self.done + sum(self.partial.values())) / self.total)
        spent = self.clock() - self.started
        estimate = self.time_left()
        if share >= 1.0:
            left = ""
        elif estimate is None:
            left = ", estimating time left"
        else:
            seconds, rough = estimate
            left = f", roughly {_about(seconds)} left" if rough else f", ~{_clock(seconds)} left"
        bar = "#" * int(share * self.width) + "." * (self.width - int(share * self.width))
        return f"[{self.label} {bar} {100 * share:3.0f}%] {_clock(spent)} spent{left} · {phase}"


def _about(seconds: float) -> str:
    """A duration to the precision a guessed rate allows: whole minutes (hours and minutes past an hour)."""
    minutes = round(seconds / 60)
    if minutes < 1:
        return "under a minute"
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"
