"""Running a comparison's runs side by side in worker processes (`CompareConfig.jobs`).

Why: the small models of a comparison use one core well and two badly (threads wait on each other),
so on an N-core machine N one-thread processes finish N runs in the time of one. Each worker runs
its share with the same code as a single process and stores every result where the single-process
loop looks for it; the caller then reads them back and writes the report. Results are the same
for any number of jobs. Runs that share a stage 1 (same key) go to one worker, so a stage 1 is
never trained twice, and the frozen-feature caches are built before any worker starts.

Stopping: Ctrl-C is the parent's alone (a worker and its data-loader processes ignore SIGINT); the
parent stops each worker by SIGTERM, which the worker raises as an interrupt, so that it unwinds and
its loaders stop their processes. A worker killed outright left them behind for good, blocked on a
pipe that nobody would read again.
"""

from __future__ import annotations

import multiprocessing
import queue as queue_module
import signal
import traceback
import time
from pathlib import Path
from typing import Any, Callable

from vlbridge.compare.config import CompareConfig
from vlbridge.compare.progress import EVAL_WEIGHT, STAGE1_STEP_WEIGHT, PhaseProgress
from vlbridge.compare.runner import (RESULT_FILE, _stored_result, feature_cache, resolve_assembly, run_key, stage1_key,
                                     train_and_evaluate)
from vlbridge.errors import VLBridgeError
from vlbridge.parts.hf_quiet import quiet_hf
from vlbridge.train.stopping import terminate_as_interrupt

Say = Callable[[str], None]
Group = tuple[int, list[str]]  # (seed, run names) that one worker runs in order
STOP_GRACE_S = 60.0  # a stopped worker unwinds in well under a second; one that has not ended by then is killed
RELAY_EVERY = 1.0  # seconds between a worker's step reports (the queue carries one message per report)


def work_groups(config: CompareConfig) -> list[tuple[float, Group]]:
    """The (run, seed) pairs still to do, grouped so that runs sharing a stage 1 stay together
    (the first of them trains it), each group with its rough cost in stage-2 steps."""
    out = Path(config.output_dir)
    groups: dict[tuple[int, str], list[str]] = {}
    costs: dict[tuple[int, str], float] = {}
    for seed in config.seeds:
        for run in config.runs:
            if _stored_result(out / "runs" / run.name / f"seed-{seed}" / RESULT_FILE, run_key(config, run, seed)) is not None:
                continue
            shared = stage1_key(config, run, seed) if run.stage1_steps else f"run:{run.name}"
            key = (seed, shared)
            first = key not in groups
            groups.setdefault(key, []).append(run.name)
            cost = run.stage2_steps + EVAL_WEIGHT * max(1, len(config.evals))
            costs[key] = costs.get(key, 0.0) + cost + (STAGE1_STEP_WEIGHT * run.stage1_steps if first else 0.0)
    return [(costs[key], (key[0], names)) for key, names in groups.items()]


def share_out(groups: list[tuple[float, Group]], jobs: int) -> list[list[Group]]:
    """Longest group first to the least-loaded worker; no empty workers."""
    loads: list[float] = [0.0] * min(jobs, len(groups))
    shares: list[list[Group]] = [[] for _ in loads]
    for cost, group in sorted(groups, key=lambda item: -item[0]):
        lightest = loads.index(min(loads))
        loads[lightest] += cost
        shares[lightest].append(group)
    return shares


class RelayedProgress:
    """A worker's PhaseProgress: sends each phase to the parent, whose progress line covers all workers."""

    def __init__(self, messages: Any, index: int) -> None:
        self.messages, self.index = messages, index
        self.sent = 0.0

    def start(self, phase: str) -> None:
        self.messages.put(("phase", self.index, phase))

    def step(self, step: int) -> None:
        """Training reached `step`: relayed at most every RELAY_EVERY seconds (the parent times the steps)."""
        if time.monotonic() - self.sent >= RELAY_EVERY:
            self.sent = time.monotonic()
            self.messages.put(("step", self.index, str(step)))

    def skip(self, run: str, seed: int) -> None:
        self.messages.put(("skip", self.index, f"{seed} {run}"))

    def finish(self) -> None:
        """The parent closes a worker's last phase when all are done."""


def _worker(config_json: str, share: list[Group], index: int, messages: Any) -> None:
    """One worker: its groups in order, each as a one-seed comparison of those runs."""
    def say(text: str) -> None:
        messages.put(("say", index, text))

    # Ctrl-C reaches every process of the terminal's group: ignored here, and in the loader processes this
    # worker starts (they inherit it), none leaves its loop before the parent stops this worker (SIGTERM)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with terminate_as_interrupt():
            config = CompareConfig.model_validate_json(config_json)
            progress = RelayedProgress(messages, index)
            for seed, names in share:  # the whole config (caches key on all of its data), these runs only
                with quiet_hf():  # a worker is no CLI process: transformers' bars would reach the user's terminal
                    train_and_evaluate(config, say, progress, only={(name, seed) for name in names})
        messages.put(("done", index, ""))
    except KeyboardInterrupt:  # stopped by the parent, which reads no more messages
        messages.cancel_join_thread()
    except VLBridgeError as error:
        messages.put(("user-error", index, str(error)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        messages.put(("error", index, traceback.format_exc()))


def _build_feature_caches(config: CompareConfig, say: Say) -> None:
    for run in config.runs:
        if run.checkpoint is None:  # a checkpoint run is evaluated, never trained: no cache
            feature_cache(config, resolve_assembly(run), say)


def run_in_workers(config: CompareConfig, say: Say = print, progress: PhaseProgress | None = None) -> frozenset[tuple[str, int]]:
    """Train and evaluate every run not yet stored in `config.jobs` processes; return the (run, seed)
    pairs they stored, when all are. Their phases reach `progress`, one lane per worker. A failure
    in one worker stops the others (what they stored is kept; a rerun resumes)."""
    shares = share_out(work_groups(config), config.jobs)
    if not shares:
        return frozenset()
    _build_feature_caches(config, say)
    context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools
    messages = context.Queue()
    config_json = config.model_dump_json()
    workers = [context.Process(target=_worker, args=(config_json, share, i, messages), name=f"vlbridge-worker-{i + 1}")
               for i, share in enumerate(shares)]
    for i, share in enumerate(shares):
        say(f"worker {i + 1}/{len(shares)}: " + "; ".join(f"{', '.join(names)} (seed {seed})" for seed, names in share))
    for worker in workers:
        worker.start()
    running = set(range(len(workers)))
    silent: set[int] = set()  # gone, and nothing from them in the queue for a whole wait
    try:
        while running:
            try:
                kind, index, text = messages.get(timeout=1.0)
            except queue_module.Empty:
                for i in sorted(running):
                    if workers[i].is_alive():
                        continue
                    if i in silent:  # died without a word (killed, out of memory)
                        raise RuntimeError(f"worker {i + 1} exited with code {workers[i].exitcode} before finishing its runs")
                    silent.add(i)  # its last words may still be on the way
                continue
            if kind == "say":
                say(f"[worker {index + 1}] {text}")
            elif kind in ("phase", "skip", "step"):
                _relay(progress, kind, index, text)
            elif kind == "done":
                running.discard(index)
                workers[index].join()
            elif kind == "user-error":
                raise VLBridgeError(text)
            else:
                raise RuntimeError(f"worker {index + 1} failed:\n{text}")
    finally:
        stop_workers(workers)
    return frozenset((name, seed) for share in shares for seed, names in share for name in names)


def stop_workers(workers: list[Any]) -> None:
    """Stop the workers still running (SIGTERM: each unwinds, its loaders' processes with it) and wait
    for every one; kill those that have not ended STOP_GRACE_S after the stop began. The grace is one
    for all of them, side by side: waited out worker by worker, N stuck workers took N times as long."""
    for worker in workers:
        if worker.is_alive():
            worker.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join()


def _relay(progress: PhaseProgress | None, kind: str, index: int, text: str) -> None:
    """A worker's phase started, its training reached a step, or a stored run was skipped, on the parent's progress line."""
    if progress is None:
        return
    if kind == "phase":
        progress.start(text, lane=index)
    elif kind == "step":
        progress.step(int(text), lane=index)
    else:
        seed, run = text.split(" ", 1)
        progress.skip(run, int(seed), lane=index)
