"""The report's lmms-eval columns: one per task and metric found in the results, read from the
"lmms:<task>" entries `vlbridge.lmms.tasks` stores (no torch, no lmms-eval).

Values are lmms-eval's own (its scale and normalisation), so a cell reads like the number a paper
reports. A metric with per-document scores gets an interval and significance marks like the other
columns; one lmms-eval aggregates otherwise shows its aggregate alone.
"""

from __future__ import annotations

import statistics
from typing import Any

from vlbridge.compare.table import Metric
from vlbridge.lmms.tasks import KEY_PREFIX as PREFIX  # light: lmms-eval is imported only when tasks are scored

UNIT = "lmms-eval score"


def lmms_metrics(rows: dict[str, list[dict[str, Any]]]) -> list[Metric]:
    """A Metric per (split, task, metric) any row was scored on, in the order first seen."""
    found: dict[tuple[str, str, str], None] = {}
    for results in rows.values():
        for result in results:
            for split, tasks in result.get("eval", {}).items():
                for key, task in tasks.items():
                    if key.startswith(PREFIX) and isinstance(task, dict):
                        found.update({(split, key, metric): None for metric in task.get("aggregate", {})})
    splits_of: dict[tuple[str, str], set[str]] = {}
    for split, key, metric in found:
        splits_of.setdefault((key, metric), set()).add(split)
    metrics = []
    for split, key, metric in found:
        label = f"{key[len(PREFIX):]} {metric}" + (f" ({split})" if len(splits_of[(key, metric)]) > 1 else "")
        metrics.append(Metric(label, split, key, "doc_id", metric, 1.0, UNIT, "{:.3f}", title=f"lmms-eval {label}"))
    return metrics


def fill_aggregates(summary: dict[str, dict[str, dict[str, Any]]], rows: dict[str, list[dict[str, Any]]],
                    metrics: list[Metric]) -> list[str]:
    """Cells of metrics without per-document scores get lmms-eval's aggregate (mean over seeds, no
    interval); returns a note per such metric, for the report."""
    notes = []
    for metric in metrics:
        filled = False
        for name, results in rows.items():
            cell = summary[name].get(metric.label)
            if cell is None or cell.get("mean") is not None:
                continue
            values = [r["eval"][metric.split][metric.task]["aggregate"][metric.value] for r in results
                      if metric.value in r.get("eval", {}).get(metric.split, {}).get(metric.task, {}).get("aggregate", {})]
            if values:
                cell.update(mean=statistics.fmean(values), n_seeds=len(values))
                filled = True
        if filled:
            notes.append(f"{metric.label}: lmms-eval gives no per-document scores for it, so its cells are the task's "
                         "aggregate, without an interval or significance test")
    return notes
