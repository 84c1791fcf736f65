"""Writing a comparison's results.json, report.md and report.png.

report.md: one table per group of runs (e.g. zero-shot, supervised), each cell "mean [95% CI]"
marked against the table's first row (▲/▼ significantly higher/lower, ≈ no significant
difference: paired bootstrap over images, 5% level), the reference rows (e.g. the blind prior)
under every table; then VQA per question type; then the key comparisons and every pair.
results.json holds every seed's results (with per-item scores), the tables and every test. Both
cover the runs and seeds asked for; other results stored in the folder are named, not reported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlbridge.files.atomic import atomic_write, atomic_write_text
from vlbridge.compare.lmms_columns import fill_aggregates, lmms_metrics
from vlbridge.compare.stats import RESAMPLES
from vlbridge.compare.table import (HEADLINE, Metric, all_pairs, compare_rows, headline_metrics, question_type_metrics, retrieval_claim,
                                    summarise, vqa_split)

Rows = dict[str, list[dict[str, Any]]]
DEFAULT_GROUP = "results"  # RunSpec.group's default: a comparison that names no groups
STATS_NOTE = (f"Intervals: 95% percentile bootstrap over test images ({RESAMPLES} resamples, fixed seed): an image is drawn with all "
              "its questions or texts, since they are not independent; with several seeds, each item's score is averaged over "
              "seeds first. Differences: the same bootstrap, paired (both rows resampled with the same images); p is two-sided; "
              "'significant' means p < 0.05, i.e. the difference's 95% interval excludes 0. Tests are not corrected for "
              "multiple comparisons: among many pairs, about 1 in 20 true ties will read 'significant'.")


def write_report(out_dir: Path, config: dict[str, Any], per_seed: Rows, notes: list[str], groups: dict[str, str] | None = None,
                 references: dict[str, dict[str, Any]] | None = None, key_pairs: list[tuple[str, str]] | None = None,
                 titles: dict[str, str] | None = None, left_out: tuple[list[dict[str, Any]], str] = ([], "")) -> dict[str, Any]:
    """results.json (everything), report.md (tables, significance, notes) and report.png.

    `groups` maps each run to its table (default: one table); `references` are rows in the shape
    of one seed's result that join every table; `key_pairs` are the comparisons listed first;
    `titles` give a table a heading other than its group name; `left_out` (the folder's stored results
    of runs or seeds not reported, and how to report them too) heads report.md and is in results.json.
    """
    from vlbridge.compare.plot import draw_report

    groups = groups or {name: DEFAULT_GROUP for name in per_seed}
    references = references or {}
    rows: Rows = {**per_seed, **{name: [row] for name, row in references.items()}}
    tables = {g: [n for n in per_seed if groups.get(n, DEFAULT_GROUP) == g] + list(references) for g in dict.fromkeys(groups.values())}
    types = question_type_metrics(rows, vqa_split(rows))
    metrics = headline_metrics(rows) + lmms_metrics(rows)  # the headline columns, then each lmms-eval task's metrics
    summary = summarise(rows, metrics)
    notes = notes + fill_aggregates(summary, rows, metrics)
    per_type = summarise(rows, types)
    significance = {
        "key": [found for a, b in (key_pairs or []) if a in rows and b in rows
                for found in [compare_rows(rows, a, b, metric) for metric in metrics] + retrieval_claim(rows, a, b, metrics)
                if found is not None],
        "vs_first_row": {g: versus_first(rows, names, metrics) for g, names in tables.items()},
        "pairs": {g: all_pairs(rows, names, metrics) for g, names in tables.items()},
    }
    notes = notes + retrieval_rules(rows) + text_cut_notes(rows)
    results = {"config": config, "runs": rows, "groups": tables, "references": list(references), "summary": summary,
               "per_question_type": per_type, "significance": significance, "notes": notes + [STATS_NOTE],
               "not_reported": left_out[0]}
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=1, default=str))
    text = markdown(config.get("name", "comparison"), tables, summary, per_type, types, significance, titles or {}, notes, metrics,
                    scope_note(*left_out))
    atomic_write_text(out_dir / "report.md", text)
    atomic_write(out_dir / "report.png", lambda tmp: draw_report(summary, tables, list(references), metrics, tmp))
    return results


def scope_note(left_out: list[dict[str, Any]], rerun_hint: str, shown: int = 8) -> str:
    """A report of fewer runs or seeds than its folder holds says so first: which results it leaves
    out, where they are, and how to report them together ('' when it leaves none out)."""
    if not left_out:
        return ""
    listed = ", ".join(f"{r['run']} seed {r['seed']} ({r['path']})" for r in left_out[:shown])
    more = f" and {len(left_out) - shown} more" if len(left_out) > shown else ""
    pairs = f"{len(left_out)} other run/seed pair{'s' if len(left_out) != 1 else ''}"
    return (f"> This report covers only the runs and seeds asked for this time. Its folder also holds the stored results of "
            f"{pairs}, not shown or compared here: {listed}{more} (results.json: not_reported). To report them together, "
            f"{rerun_hint}.")


def versus_first(rows: Rows, names: list[str], metrics: list[Metric]) -> dict[str, dict[str, dict[str, Any]]]:
    """row -> metric -> its paired difference from the table's first row (which is left out)."""
    if not names:
        return {}
    first = names[0]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name in names[1:]:
        found = {m.label: d for m in metrics if (d := compare_rows(rows, name, first, m)) is not None}
        if found:
            out[name] = found
    return out


def text_cut_notes(rows: Rows) -> list[str]:
    """Each run's training texts cut at max_text_tokens (BLIP-2's 32, as LAVIS cuts them), stated
    once per run and stage: the trainer of a comparison does not warn, so the report says it."""
    found = []
    for name, results in rows.items():
        for stage in ("stage1", "stage2"):
            cut = [(r.get("seed"), text) for r in results
                   if isinstance(text := (r.get("train", {}).get(stage) or {}).get("texts_cut"), str) and text]
            if cut:
                seed, text = cut[0]
                found.append(f"{name}, {stage.replace('stage', 'stage ')}: {text}" + (f" (seed {seed})" if len(results) > 1 else ""))
    return [f"Training texts cut at max_text_tokens (BLIP-2's 32, as LAVIS): {'; '.join(found)}."] if found else []


def retrieval_rules(rows: Rows) -> list[str]:
    """The rule each scored retrieval used to count a caption right, stated once."""
    rules = {task["rule"] for results in rows.values() for r in results for split in r.get("eval", {}).values()
             if isinstance(task := split.get("retrieval"), dict) and task.get("rule")}
    return [f"Retrieval rule: {rule}." for rule in sorted(rules)]


def mark(difference: dict[str, Any] | None) -> str:
    """▲ / ▼ significantly above / below the first row; ≈ not significantly different."""
    if difference is None:
        return ""
    if not difference["significant"]:
        return " ≈"
    return " ▲" if difference["diff"] > 0 else " ▼"


def format_cell(cell: dict[str, Any] | None, fmt: str, difference: dict[str, Any] | None = None) -> str:
    """"mean [low, high]", the seed spread where several seeds ran, and the mark against the first row."""
    if not cell or cell.get("mean") is None:
        return "–"
    text = fmt.format(cell["mean"])
    if cell.get("low") is not None:
        text += f" [{fmt.format(cell['low'])}, {fmt.format(cell['high'])}]"
    if cell.get("seed_std") is not None:
        text += f", sd {fmt.format(cell['seed_std'])} over {cell['n_seeds']} seeds"
    return text + mark(difference)


def markdown_table(names: list[str], summary: dict[str, dict[str, Any]], columns: list[tuple[str, str]],
                   versus: dict[str, dict[str, dict[str, Any]]] | None = None) -> str:
    """| row | column... | with "mean [low, high]" cells, marked by `versus` (row -> label -> difference
    from the first row); columns without any value are left out."""
    versus = versus or {}
    shown = [(label, fmt) for label, fmt in columns if any(summary[n].get(label, {}).get("mean") is not None for n in names)]
    lines = ["| run | " + " | ".join(label for label, _ in shown) + " |", "|---|" + "---|" * len(shown)]
    for name in names:
        cells = [format_cell(summary[name].get(label), fmt, versus.get(name, {}).get(label)) for label, fmt in shown]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_headings(tables: dict[str, list[str]], titles: dict[str, str]) -> dict[str, str]:
    """group -> its heading: its title, else its name; "" for the one unnamed table (the default
    group), which reads "Results" rather than "results: results"."""
    return {group: titles.get(group, "" if group == DEFAULT_GROUP and len(tables) == 1 else group) for group in tables}


def significance_table(found: list[dict[str, Any]], formats: dict[str, str]) -> str:
    lines = ["| comparison | metric | difference [95% CI] | p | at 5% |", "|---|---|---|---|---|"]
    for d in found:
        fmt = formats.get(d["metric"], "{:.1f}")
        sign = "+" if d["diff"] > 0 else ""
        lines.append(f"| {d['a']} − {d['b']} | {d['metric']} | {sign}{fmt.format(d['diff'])} [{fmt.format(d['low'])}, "
                     f"{fmt.format(d['high'])}] | {d['p']:.3f} | {'**significant**' if d['significant'] else 'not significant'} |")
    return "\n".join(lines)


def markdown(name: str, tables: dict[str, list[str]], summary: dict, per_type: dict, types: list[Metric], significance: dict,
             titles: dict[str, str], notes: list[str], metrics: list[Metric] = HEADLINE, scope: str = "") -> str:
    columns = [("visual tokens", "{:.0f}")] + [(m.label, m.fmt) for m in metrics]
    formats = {m.label: m.fmt for m in metrics + types}
    headings = table_headings(tables, titles)
    text = [f"# {name}", ""] + ([scope, ""] if scope else [])
    for group, names in tables.items():
        versus = significance["vs_first_row"].get(group, {})
        text += [f"## {headings[group] or 'Results'}", "", markdown_table(names, summary, columns, versus), ""]
        if versus:
            text += [f"Each cell: mean [95% CI]. Marks compare a row with **{names[0]}** on the same test images (paired "
                     "bootstrap, 5% level): ▲ significantly higher, ▼ significantly lower, ≈ no significant difference.", ""]
        if any(summary[n].get(label, {}).get("seed_std") is not None for n in names for label, _ in columns):
            text += ["sd: standard deviation of the per-seed means (sample, n − 1: how much a rerun with another seed moves the number); "
                     "the interval is over test images, with each item averaged over the seeds.", ""]
    if types:
        for group, names in tables.items():
            suffix = f": {headings[group]}" if headings[group] else ""
            answered = [n for n in names if any(per_type[n].get(m.label, {}).get("mean") is not None for m in types)]  # not a retrieval-only row
            text += [f"### VQA accuracy (%) per question type, {types[0].split} split{suffix}", "",
                     markdown_table(answered, per_type, [(m.label, m.fmt) for m in types]), ""]
    text += ["## Significance", "", "Differences between rows (row − row) on the same test items, with 95% intervals and "
             "two-sided p-values from a paired bootstrap over images; 'significant' at the 5% level.", ""]
    if significance["key"]:
        text += ["### Key comparisons", "", significance_table(significance["key"], formats), ""]
    for group, found in significance["pairs"].items():
        if found:
            suffix = f": {headings[group]}" if headings[group] else ""
            text += [f"<details><summary>All pairwise differences{suffix}</summary>", "",
                     significance_table(found, formats), "", "</details>", ""]
    text += ["## Notes", ""] + [f"- {n}" for n in notes + [STATS_NOTE]]
    return "\n".join(text) + "\n"
