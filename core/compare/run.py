"""A whole comparison: share the runs out to worker processes (if asked), train and evaluate them
(`runner`), then write the report. It sits above both `runner` and `workers`, so the workers can
call the runner without the runner knowing about workers (one direction, no loop)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from vlbridge.compare.config import CompareConfig
from vlbridge.compare.footing import footing_notes
from vlbridge.compare.preflight import preflight
from vlbridge.compare.progress import PhaseProgress, phase_plan
from vlbridge.compare.report import write_report
from vlbridge.compare.runner import RESULT_FILE, Say, stage1_trainers, train_and_evaluate
from vlbridge.compare.workers import run_in_workers

COMPARE_RERUN = "add them to the config's runs and seeds (results stored under the same settings are reused, not retrained)"


def run_compare(config: CompareConfig, say: Say = print, notes: list[str] | None = None, progress_label: str = "compare",
                reference_rows: Callable[[], dict[str, dict[str, Any]]] | None = None, key_pairs: list[tuple[str, str]] | None = None,
                titles: dict[str, str] | None = None, rerun_hint: str = COMPARE_RERUN) -> dict[str, Any]:
    """Train and evaluate every run for every seed, then write results.json, report.md, report.png.

    With `config.jobs` > 1 the runs are shared out to worker processes first (each stores its
    results; this process then reads them back). `reference_rows` makes rows (e.g. a blind answer
    prior) that join every table, results in the shape of one seed's; it is called after the
    preflight, so that they are never computed for a comparison it refuses, nor meet a bad image
    before it does. `key_pairs` (row, row) are the comparisons the report shows first; `titles` head
    the tables (group -> title). Results the folder holds of other runs or seeds (an earlier
    invocation's) are not reported; the report names them, and `rerun_hint` says how to report them
    together.
    """
    from vlbridge.compare.runner import forget_image_digests

    forget_image_digests()  # a rerun in the same process sees images changed since the last
    if any(e.lmms_eval is not None for e in config.evals):
        from vlbridge.lmms.tasks import require_lmms_eval

        require_lmms_eval()  # said now, not after every run has trained
    preflight(config)  # every run's and split's problems, before anything is cached or trained
    references = reference_rows() if reference_rows is not None else {}
    out = Path(config.output_dir)
    progress = PhaseProgress(phase_plan(config, stage1_trainers(config)), say, label=progress_label)
    collected = run_in_workers(config, say, progress) if config.jobs > 1 else frozenset()
    per_seed = train_and_evaluate(config, say, progress, collected=collected)
    progress.finish()
    say(progress.line("done"))
    groups = {run.name: run.group for run in config.runs}
    return write_report(out, config.model_dump(mode="json"), per_seed, footing_notes(config) + (notes or []), groups=groups,
                        references=references, key_pairs=key_pairs or [], titles=titles,
                        left_out=(results_left_out(config), rerun_hint))


def results_left_out(config: CompareConfig) -> list[dict[str, Any]]:
    """The results stored in the output folder of run/seed pairs this config does not ask for (an earlier
    invocation's, e.g. before a narrower --runs or --seeds): {"run", "seed", "path"} each, path relative
    to the folder. The report covers only the pairs asked for, so it must say these exist."""
    out = Path(config.output_dir)
    asked = {(run.name, str(seed)) for run in config.runs for seed in config.seeds}
    found = []
    for path in sorted(out.glob(f"runs/*/seed-*/{RESULT_FILE}")):
        name, seed = path.parent.parent.name, path.parent.name.removeprefix("seed-")
        if (name, seed) not in asked:
            found.append({"run": name, "seed": int(seed) if seed.lstrip("-").isdigit() else seed, "path": str(path.relative_to(out))})
    return found
