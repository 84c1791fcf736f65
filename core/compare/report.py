"""Aggregating a comparison over seeds and writing results.json, report.md and report.png.

The plot is drawn with Pillow (already a dependency) rather than adding matplotlib for one chart.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from vlbridge.atomic import atomic_write, atomic_write_text

# (label, path into one seed's result, format)
COLUMNS: list[tuple[str, str, str]] = [
    ("visual tokens", "cost.visual_tokens", "{:.0f}"),
    ("LLM fwd ms", "cost.llm_forward_ms", "{:.1f}"),
    ("VQA %", "eval.test.vqa.overall", "{:.1f}"),
    ("VQA comp %", "eval.comp.vqa.overall", "{:.1f}"),
    ("R@1 i2t", "eval.test.retrieval.itm.i2t_r1", "{:.1f}"),
    ("R@1 t2i", "eval.test.retrieval.itm.t2i_r1", "{:.1f}"),
    ("R@1 i2t ITC", "eval.test.retrieval.itc.i2t_r1", "{:.1f}"),
    ("R@1 t2i ITC", "eval.test.retrieval.itc.t2i_r1", "{:.1f}"),
    ("CIDEr", "eval.test.caption.CIDEr", "{:.3f}"),
    ("BLEU-4", "eval.test.caption.Bleu_4", "{:.3f}"),
    ("train s", "train.train_seconds", "{:.0f}"),
]
PLOTTED = [("VQA %", 100.0), ("R@1 i2t", 100.0), ("CIDEr", None)]


def lookup(result: dict[str, Any], path: str) -> float | None:
    value: Any = result
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, (int, float)) else None


def aggregate(per_seed: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """run -> column -> {mean, std, n} over seeds (std 0 with one seed)."""
    table: dict[str, dict[str, dict[str, float | None]]] = {}
    for run, results in per_seed.items():
        table[run] = {}
        for label, path, _ in COLUMNS + _question_type_columns(results):
            values = [v for v in (lookup(r, path) for r in results) if v is not None]
            table[run][label] = {"mean": statistics.fmean(values) if values else None,
                                 "std": statistics.pstdev(values) if len(values) > 1 else 0.0, "n": len(values)}
    return table


def _question_type_columns(results: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    types = sorted({t for r in results for t in (lookup_dict(r, "eval.test.vqa.per_question_type") or {})})
    return [(f"VQA {t}", f"eval.test.vqa.per_question_type.{t}", "{:.1f}") for t in types]


def lookup_dict(result: dict[str, Any], path: str) -> dict[str, Any] | None:
    value: Any = result
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value if isinstance(value, dict) else None


def markdown_table(table: dict[str, dict[str, dict[str, float | None]]], columns: list[str]) -> str:
    fmt = {label: f for label, _, f in COLUMNS}
    lines = ["| run | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for run, cells in table.items():
        row = []
        for column in columns:
            cell = cells.get(column, {"mean": None})
            if cell["mean"] is None:
                row.append("–")
                continue
            text = fmt.get(column, "{:.1f}").format(cell["mean"])
            row.append(text + (f" ± {fmt.get(column, '{:.1f}').format(cell['std'])}" if cell.get("n", 0) > 1 else ""))
        lines.append(f"| {run} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_report(out_dir: Path, config: dict[str, Any], per_seed: dict[str, list[dict[str, Any]]], notes: list[str]) -> dict[str, Any]:
    """results.json (everything), report.md (tables and how to read them) and report.png."""
    table = aggregate(per_seed)
    main_columns = [label for label, _, _ in COLUMNS if any(c[label]["mean"] is not None for c in table.values())]
    fixed = {label for label, _, _ in COLUMNS}
    type_columns = sorted({label for cells in table.values() for label in cells if label.startswith("VQA ") and label not in fixed})
    results = {"config": config, "runs": per_seed, "summary": table, "notes": notes}
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=1, default=str))
    text = [f"# {config.get('name', 'comparison')}", "", markdown_table(table, main_columns), ""]
    if type_columns:
        text += ["VQA accuracy (%) per question type, test split:", "", markdown_table(table, type_columns), ""]
    text += [f"- {n}" for n in notes]
    atomic_write_text(out_dir / "report.md", "\n".join(text) + "\n")
    atomic_write(out_dir / "report.png", lambda tmp: draw_bars(table, tmp))
    return results


def draw_bars(table: dict[str, dict[str, dict[str, float | None]]], path: Path) -> None:
    """Grouped bars: one panel per plotted metric, one bar per run (mean, with a spread tick)."""
    from PIL import Image, ImageDraw

    runs = list(table)
    panel_w, panel_h, margin = 60 + 46 * len(runs), 260, 40
    image = Image.new("RGB", (margin + len(PLOTTED) * (panel_w + margin), panel_h + 150), "white")
    draw = ImageDraw.Draw(image)
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127)]
    for p, (metric, ceiling) in enumerate(PLOTTED):
        x0, y0 = margin + p * (panel_w + margin), 30
        values = [table[r].get(metric, {}).get("mean") for r in runs]
        top = ceiling or max([v for v in values if v is not None] + [1e-9]) * 1.15
        draw.text((x0, 8), metric, fill="black")
        draw.line([(x0, y0), (x0, y0 + panel_h), (x0 + panel_w, y0 + panel_h)], fill="black")
        draw.text((x0 - 34, y0 - 4), f"{top:.3g}", fill="gray")
        for i, (run, value) in enumerate(zip(runs, values)):
            if value is None:
                continue
            left = x0 + 10 + i * 46
            height = int(panel_h * min(value / top, 1.0))
            draw.rectangle([left, y0 + panel_h - height, left + 30, y0 + panel_h], fill=palette[i % len(palette)])
            draw.text((left, y0 + panel_h - height - 12), f"{value:.3g}", fill="black")
    for i, run in enumerate(runs):
        y = panel_h + 50 + 14 * i
        draw.rectangle([margin, y, margin + 10, y + 10], fill=palette[i % len(palette)])
        draw.text((margin + 16, y - 1), run, fill="black")
    image.save(path, format="PNG")
