"""The comparison's numbers: which metrics the tables show, each row's per-item scores, their 95%
intervals, and the paired differences between rows (no I/O, no torch).

A row is a run (one result per seed) or a reference row (the blind prior: one result). A metric
reads a column of per-item scores from a result ("items" of an evaluation), keyed so that two rows
line up item by item, with the image each item belongs to (the bootstrap's cluster). Results
without items (made before they were kept) still give a mean, without an interval.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from itertools import combinations
from typing import Any, Hashable

from vlbridge.compare.stats import bootstrap_ci, paired_difference, seed_mean

Result = dict[str, Any]
Items = dict[Hashable, tuple[Hashable, float]]  # item key -> (image, score)


@dataclass(frozen=True)
class Metric:
    """One column: where its items are in a seed's result and how it is printed."""

    label: str
    split: str
    task: str  # vqa, caption or retrieval
    key: str  # the item column that identifies an item across rows
    value: str  # the item column holding the score
    scale: float  # items -> table units (100: a share in [0, 1] as percent)
    unit: str  # axis label of the plot
    fmt: str = "{:.1f}"
    direction: str | None = None  # retrieval: i2t or t2i
    question_type: str | None = None  # VQA: only questions of this type
    title: str = ""  # the plot panel's title (default: the label)

    def items(self, result: Result) -> Items | None:
        task = result.get("eval", {}).get(self.split, {}).get(self.task)
        if not isinstance(task, dict) or "items" not in task:
            return None
        columns = task["items"][self.direction] if self.direction else task["items"]
        if self.value not in columns:  # a row without this score (a CLIP model retrieves by ITC alone, no ITM)
            return None
        rows = zip(columns[self.key], columns["image_id"], columns[self.value])
        if self.question_type is not None:
            rows = ((k, i, v) for (k, i, v), t in zip(rows, columns["question_type"]) if t == self.question_type)
        return {k: (image, float(v)) for k, image, v in rows}


def _vqa(label: str, split: str, title: str = "") -> Metric:
    return Metric(label, split, "vqa", "question_id", "accuracy", 100.0, "VQAv2 accuracy (%)", title=title)


def _recall(label: str, direction: str, head: str, split: str = "test", where: str = "") -> Metric:
    key = "image_id" if direction == "i2t" else "text_key"
    arrow = "image → text" if direction == "i2t" else "text → image"
    return Metric(label, split, "retrieval", key, f"{head}_hit1", 100.0, "recall@1 (%)", direction=direction,
                  title=f"Retrieval {arrow}, {head.upper()}{where}")


HEADLINE: list[Metric] = [
    _vqa("VQA %", "test", "VQA, test split"),
    _vqa("VQA comp %", "comp", "VQA, compositional split"),
    Metric("CIDEr", "test", "caption", "image_id", "CIDEr", 1.0, "CIDEr-D (pycocoevalcap scale)", "{:.3f}", title="Captioning, test split"),
    _recall("R@1 i2t", "i2t", "itm"),
    _recall("R@1 t2i", "t2i", "itm"),
    _recall("R@1 i2t ITC", "i2t", "itc"),
    _recall("R@1 t2i ITC", "t2i", "itc"),
]


def split_columns(split: str) -> list[Metric]:
    """VQA, CIDEr and R@1 columns of a split other than "test", labelled with its name ("VQA % (val)")."""
    tag, where = f" ({split})", f", {split} split"
    return [_vqa(f"VQA %{tag}", split, f"VQA{where}"),
            Metric(f"CIDEr{tag}", split, "caption", "image_id", "CIDEr", 1.0, "CIDEr-D (pycocoevalcap scale)", "{:.3f}",
                   title=f"Captioning{where}"),
            _recall(f"R@1 i2t{tag}", "i2t", "itm", split, where), _recall(f"R@1 t2i{tag}", "t2i", "itm", split, where),
            _recall(f"R@1 i2t ITC{tag}", "i2t", "itc", split, where), _recall(f"R@1 t2i ITC{tag}", "t2i", "itc", split, where)]


def _column(metric: Metric) -> tuple:
    return metric.split, metric.task, metric.value, metric.direction


def headline_metrics(rows: dict[str, list[Result]]) -> list[Metric]:
    """HEADLINE (the demo's "test" and "comp" splits), then the same columns of every other split the
    rows were scored on, in the order first seen: a config's own split names ("val", "coco-test")
    would otherwise reach results.json but no table, plot or significance test."""
    splits = dict.fromkeys(split for results in rows.values() for r in results for split in r.get("eval", {}))
    shown = {_column(m) for m in HEADLINE}
    return HEADLINE + [m for split in splits if split != "test" for m in split_columns(split) if _column(m) not in shown]


def vqa_split(rows: dict[str, list[Result]]) -> str:
    """The split whose VQA is broken down by question type: "test", else the first split with VQA."""
    splits = [split for results in rows.values() for r in results for split, tasks in r.get("eval", {}).items()
              if isinstance(tasks, dict) and "vqa" in tasks]
    return "test" if "test" in splits or not splits else splits[0]


def question_type_metrics(rows: dict[str, list[Result]], split: str = "test") -> list[Metric]:
    """One VQA metric per question type found in the rows' items of `split`."""
    types: set[str] = set()
    for results in rows.values():
        for result in results:
            vqa = result.get("eval", {}).get(split, {}).get("vqa") or {}
            types.update(t for t in vqa.get("items", {}).get("question_type", []) if t is not None)
    return [replace(_vqa(f"VQA {t}", split), question_type=t) for t in sorted(types)]


def row_items(results: list[Result], metric: Metric) -> Items | None:
    """A row's items for a metric, each score averaged over the seeds that scored it."""
    per_seed = [items for items in (metric.items(r) for r in results) if items is not None]
    if not per_seed:
        return None
    images = {k: image for items in per_seed for k, (image, _) in items.items()}
    means = seed_mean([{k: v for k, (_, v) in items.items()} for items in per_seed])
    return {k: (images[k], v) for k, v in means.items()}


def _stored_mean(results: list[Result], metric: Metric) -> float | None:
    """Old results without items: the stored aggregate (VQA overall, CIDEr, R@1), mean over seeds."""
    values = []
    for result in results:
        task = result.get("eval", {}).get(metric.split, {}).get(metric.task) or {}
        if metric.task == "vqa":
            value = task.get("per_question_type", {}).get(metric.question_type) if metric.question_type else task.get("overall")
        elif metric.task == "caption":
            value = task.get(metric.value)
        else:
            value = task.get(metric.value.split("_")[0], {}).get(f"{metric.direction}_r1")
        if isinstance(value, (int, float)):
            values.append(float(value))
    return statistics.fmean(values) if values else None


def cell(results: list[Result], metric: Metric) -> dict[str, Any]:
    """{mean, low, high, n_items, n_seeds, seed_std} in table units; low/high None without items."""
    items = row_items(results, metric)
    if not items:
        mean = _stored_mean(results, metric)
        return {"mean": mean, "low": None, "high": None, "n_items": 0, "n_seeds": len(results) if mean is not None else 0, "seed_std": None}
    keys = list(items)
    ci = bootstrap_ci([items[k][1] for k in keys], [items[k][0] for k in keys])
    seed_means = [sum(v for _, v in s.values()) / len(s) * metric.scale for s in (metric.items(r) for r in results) if s]
    return {"mean": ci.mean * metric.scale, "low": ci.low * metric.scale, "high": ci.high * metric.scale, "n_items": len(keys),
            "n_seeds": len(seed_means), "seed_std": seed_spread(seed_means)}


def seed_spread(seed_means: list[float]) -> float | None:
    """The sample standard deviation (n - 1) of the per-seed means, as papers' "mean ± sd over seeds":
    the population one understates a rerun's spread from few seeds (by 1/sqrt(2) with two). None for one seed."""
    return statistics.stdev(seed_means) if len(seed_means) > 1 else None


def summarise(rows: dict[str, list[Result]], metrics: list[Metric]) -> dict[str, dict[str, dict[str, Any]]]:
    """row -> metric label -> cell; plus "visual tokens" and "LLM fwd ms" (no interval)."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for name, results in rows.items():
        table[name] = {m.label: cell(results, m) for m in metrics}
        for label, path in (("visual tokens", ("cost", "visual_tokens")), ("LLM fwd ms", ("cost", "llm_forward_ms")),
                            ("train s", ("train", "train_seconds"))):
            values = [r[path[0]][path[1]] for r in results if isinstance(r.get(path[0]), dict) and path[1] in r[path[0]]]
            table[name][label] = {"mean": statistics.fmean(values) if values else None, "low": None, "high": None}
    return table


def compare_rows(rows: dict[str, list[Result]], a: str, b: str, metric: Metric, b_metric: Metric | None = None) -> dict[str, Any] | None:
    """Row a minus row b on the items both scored (paired cluster bootstrap), in table units; with
    `b_metric`, b's scores come from that column (labelled "a's column vs b's column")."""
    first, second = row_items(rows[a], metric), row_items(rows[b], b_metric or metric)
    if not first or not second:
        return None
    keys = [k for k in first if k in second]
    if not keys:
        return None
    d = paired_difference([first[k][1] for k in keys], [second[k][1] for k in keys], [first[k][0] for k in keys])
    label = metric.label if b_metric is None else f"{metric.label} vs {b_metric.label}"
    return {"metric": label, "a": a, "b": b, "diff": d.diff * metric.scale, "low": d.low * metric.scale,
            "high": d.high * metric.scale, "p": d.p, "significant": d.significant, "n_items": d.n_items}


def retrieval_claim(rows: dict[str, list[Result]], a: str, b: str, metrics: list[Metric]) -> list[dict[str, Any]]:
    """BLIP-2's retrieval claim as it states it: row a's ITM re-ranked recall against row b's ITC
    recall, per direction, where b retrieves by ITC alone (a CLIP model has no ITM head, so the
    same-column comparison cannot be made)."""
    out = []
    for itm in (m for m in metrics if m.task == "retrieval" and m.value == "itm_hit1"):
        if row_items(rows[b], itm) is not None:
            continue
        for itc in (m for m in metrics if m.task == "retrieval" and m.value == "itc_hit1" and m.direction == itm.direction):
            if (found := compare_rows(rows, a, b, itm, itc)) is not None:
                out.append(found)
    return out


def all_pairs(rows: dict[str, list[Result]], names: list[str], metrics: list[Metric]) -> list[dict[str, Any]]:
    """Every pairwise difference between the named rows, metric by metric (where both have items)."""
    out = []
    for metric in metrics:
        for a, b in combinations(names, 2):
            found = compare_rows(rows, a, b, metric)
            if found is not None:
                out.append(found)
    return out
