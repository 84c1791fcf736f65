"""lmms-eval tasks as a compare evaluation: a model scored by lmms-eval's own evaluator, and its
results in the shape the compare report reads (aggregates, and per-document scores where the task
gives them, so the report can put intervals on them and test differences).

A metric gets per-document items when every logged document carries a number for it and their mean
is the task's aggregate (exact match, accuracy, ...); a metric lmms-eval aggregates otherwise (a
corpus-level CIDEr, a submission file) keeps its aggregate only, and the report says so.
"""

from __future__ import annotations

import contextlib
import math
import random
from typing import Any, Callable, Iterator

from vlbridge.errors import VLBridgeError
from vlbridge.lmms.options import LmmsEvalSpec

Say = Callable[[str], None]
KEY_PREFIX = "lmms:"  # a compare result's eval split holds each task under "lmms:<task>"
INSTALL_HINT = 'lmms-eval tasks need the lmms-eval extra: pip install "vlbridge[lmms-eval]"'


def require_lmms_eval() -> None:
    """A clear error, before any work, when the lmms-eval extra is not installed."""
    import importlib.util

    if importlib.util.find_spec("lmms_eval") is None:
        raise VLBridgeError(INSTALL_HINT)


def score_tasks(model: Any, spec: LmmsEvalSpec, say: Say = print) -> dict[str, dict[str, Any]]:
    """"lmms:<task>" -> {lmms_task, aggregate, items, n_samples, higher_is_better} for every task of `spec`."""
    require_lmms_eval()
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from vlbridge.lmms.model import VLBridgeLMM

    manager = TaskManager("WARNING", include_path=spec.include_path, include_defaults=spec.include_defaults)
    unknown = [task for task in spec.tasks if task not in manager.all_tasks]
    if unknown:
        where = f"under include_path {spec.include_path}" if spec.include_path else "in lmms-eval"
        raise VLBridgeError(f"lmms-eval tasks {unknown} not found {where}; known tasks include "
                            f"{sorted(manager.all_tasks)[:10]} (lmms-eval --tasks list shows them all)")
    tags = {task: manager.task_index[task]["task"] for task in spec.tasks if manager.task_index[task]["type"] == "tag"}
    if tags:  # lmms-eval scores a tag's tasks and gives the tag no result: said now, not after scoring them
        raise VLBridgeError(f"lmms-eval tags {sorted(tags)} are labels on tasks, with no result of their own; list their tasks "
                            f"instead ({'; '.join(f'{tag}: {members}' for tag, members in tags.items())})")
    say(f"  lmms-eval: {', '.join(spec.tasks)}")
    wrapper = VLBridgeLMM.wrap(model, prompt=spec.prompt, batch_size=spec.batch_size, max_new_tokens=spec.max_new_tokens)
    with untouched_random_state():
        results = simple_evaluate(model=wrapper, tasks=list(spec.tasks), task_manager=manager, limit=spec.limit,
                                  log_samples=True, bootstrap_iters=0, verbosity="WARNING")
    return {f"{KEY_PREFIX}{task}": task_result(task, results) for task in spec.tasks}


def task_result(task: str, results: dict[str, Any]) -> dict[str, Any]:
    """One task's aggregates ("metric" or "metric,filter") and per-document items from lmms-eval's results."""
    raw = results["results"][task]
    aggregate: dict[str, float] = {}
    filters: set[str] = set()
    for key, value in raw.items():
        metric, _, filter_name = key.partition(",")
        if not filter_name or "_stderr" in metric or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        filters.add(filter_name)
        aggregate[metric if filter_name == "none" else key] = float(value)
    samples = results.get("samples", {}).get(task, [])
    out: dict[str, Any] = {"lmms_task": task, "aggregate": aggregate, "n_samples": len(samples),
                           "higher_is_better": results.get("higher_is_better", {}).get(task, {})}
    if len(filters) == 1:  # logged samples do not say which filter scored them: items only when there is one
        items = per_document(samples, {key.partition(",")[0]: value for key, value in aggregate.items()})
        if items:
            out["items"] = items
    return out


def per_document(samples: list[dict[str, Any]], aggregate: dict[str, float]) -> dict[str, list[Any]]:
    """{"doc_id", "image_id", metric...} columns for the metrics whose documents' mean is the aggregate."""
    if not samples:
        return {}
    ids = [sample["doc_id"] for sample in samples]
    columns: dict[str, list[Any]] = {"doc_id": ids, "image_id": ids}  # one image per document: its own cluster
    for metric, value in aggregate.items():
        scores = [sample.get(metric) for sample in samples]
        numbers = all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores)
        if numbers and math.isclose(sum(scores) / len(scores), value, rel_tol=1e-9, abs_tol=1e-12):
            columns[metric] = [float(s) for s in scores]
    answers = [_answer(sample) for sample in samples]
    if all(isinstance(a, str) for a in answers):
        columns["answer"] = answers
    return columns if len(columns) > 2 else {}


def _answer(sample: dict[str, Any]) -> Any:
    responses = sample.get("filtered_resps") or [None]
    return responses[0] if len(responses) == 1 else None


@contextlib.contextmanager
def untouched_random_state() -> Iterator[None]:
    """lmms-eval seeds python, numpy and torch for its run; the comparison's own streams come back after."""
    import numpy as np
    import torch

    state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(state)
            np.random.set_state(np_state)
