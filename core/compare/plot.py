"""report.png: one panel per headline metric, a horizontal bar per run (its 95% interval as an
error bar, its table's colour) and each reference row (the blind prior) as a dashed line. Drawn
on a bare matplotlib Figure (Agg), so no display is needed and pyplot's global state is untouched."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from vlbridge.compare.table import Metric

COLUMNS = 4
LINE_STYLES = ["--", ":", "-.", (0, (5, 1, 1, 1))]


def draw_report(summary: dict[str, dict[str, Any]], tables: dict[str, list[str]], references: list[str], metrics: list[Metric],
                path: Path) -> None:
    """Draw the panels of the metrics any row has a value for and save a PNG to `path`."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # not pyplot: no global backend or figure state is touched
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    runs = [(name, group) for group, names in tables.items() for name in names if name not in references]
    runs = list(dict.fromkeys(runs))
    shown = [m for m in metrics if any(summary[n].get(m.label, {}).get("mean") is not None for n in summary)]
    palette = colormaps["tab10"].colors
    colours = {group: palette[i % len(palette)] for i, group in enumerate(tables)}
    rows = math.ceil((len(shown) + 1) / COLUMNS)
    height = max(2.6, 0.32 * len(runs) + 1.3)
    fig = Figure(figsize=(COLUMNS * 4.2, rows * height), layout="constrained")
    axes = fig.subplots(rows, COLUMNS, squeeze=False)
    flat = list(axes.flat)
    for ax, metric in zip(flat, shown):
        _panel(ax, metric, runs, summary, references, colours)
    for ax in flat[len(shown):]:
        ax.axis("off")
    handles = [Patch(color=colours[g], label=g) for g in tables]  # group names: the titles are the report's
    handles += [Line2D([], [], color="black", linestyle=LINE_STYLES[i % len(LINE_STYLES)], label=name) for i, name in enumerate(references)]
    handles.append(Line2D([], [], color="black", marker="|", linestyle="none", markersize=10, label="95% CI (bootstrap over images)"))
    flat[len(shown)].legend(handles=handles, loc="center", frameon=False, fontsize=9)
    fig.savefig(path, format="png", dpi=110)


def _panel(ax, metric: Metric, runs: list[tuple[str, str]], summary: dict, references: list[str], colours: dict) -> None:
    """One metric: bars top to bottom in table order, intervals as error bars, references as lines."""
    positions = list(range(len(runs)))[::-1]
    for y, (name, group) in zip(positions, runs):
        cell = summary[name].get(metric.label) or {}
        if cell.get("mean") is None:
            # x in axes fractions: inside the panel, clear of the axis line, whatever the metric's scale
            ax.text(0.02, y, "not scored", transform=ax.get_yaxis_transform(), va="center", fontsize=7, color="grey")
            continue
        error = None
        if cell.get("low") is not None:
            error = [[cell["mean"] - cell["low"]], [cell["high"] - cell["mean"]]]
        ax.barh(y, cell["mean"], xerr=error, color=colours[group], alpha=0.85, height=0.7,
                error_kw={"ecolor": "black", "capsize": 2, "linewidth": 1})
    for i, name in enumerate(references):
        value = (summary[name].get(metric.label) or {}).get("mean")
        if value is not None:
            ax.axvline(value, color="black", linestyle=LINE_STYLES[i % len(LINE_STYLES)], linewidth=1.2)
    ax.set_yticks(positions, [name for name, _ in runs], fontsize=8)
    ax.set_ylim(-0.6, len(runs) - 0.4)  # every row inside the panel, scored or not (not only the bars' span)
    ax.set_title(metric.title or metric.label, fontsize=10)
    ax.set_xlabel(metric.unit, fontsize=9)
    ax.set_xlim(0, _axis_end(metric, runs, summary, references))
    ax.grid(axis="x", alpha=0.3)
    ax.tick_params(axis="x", labelsize=8)


def _axis_end(metric: Metric, runs: list[tuple[str, str]], summary: dict, references: list[str]) -> float:
    """Room for every bar, interval and reference line: a few-percent recall stays readable, and a
    percentage never runs past 100."""
    values = [v for name in [n for n, _ in runs] + references for key in ("mean", "high")
              if (v := (summary[name].get(metric.label) or {}).get(key)) is not None]
    end = 1.15 * max(values, default=1.0) or 1.0
    return min(end, 100.0) if metric.scale == 100.0 else end
