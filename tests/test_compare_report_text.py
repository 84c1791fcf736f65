"""What a comparison's report shows its reader: the seed spread it promises, plain headings for a
single table, and "not scored" clear of the plot's axis."""

from __future__ import annotations

import re
import statistics

import pytest

from tests.test_compare_report import _result
from vlbridge.compare.plot import _panel
from vlbridge.compare.report import write_report
from vlbridge.compare.table import HEADLINE, summarise


def test_cells_show_the_seed_spread(tmp_path):
    rows = {"q": [_result(0, 3, True), _result(1, 2, True)], "lin": [_result(0, 2, False)]}  # seed means 66.7 and 50
    write_report(tmp_path, {"name": "t"}, rows, [])
    report = (tmp_path / "report.md").read_text()
    q = next(line for line in report.splitlines() if line.startswith("| q |"))
    lin = next(line for line in report.splitlines() if line.startswith("| lin |"))
    std = summarise(rows, HEADLINE)["q"]["VQA %"]["seed_std"]
    assert std > 0 and "58.3 [" in q and f"sd {std:.1f} over 2 seeds" in q
    assert "over 2 seeds" not in lin  # one seed: no spread to show
    assert "sd: standard deviation of the per-seed means" in report


def test_one_table_without_groups_has_plain_headings(tmp_path):
    write_report(tmp_path, {"name": "t"}, {"q": [_result(0, 3, True)], "lin": [_result(0, 2, False)]}, [])
    report = (tmp_path / "report.md").read_text()
    headings = re.findall(r"^#+ .*$", report, re.MULTILINE)
    assert "## Results" in headings and not any("results" in h for h in headings), headings
    assert "### VQA accuracy (%) per question type, test split\n" in report


def test_not_scored_is_drawn_clear_of_the_axis():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = {"q": [_result(0, 3, True)], "lin": [_result(0, 2, False)]}
    summary = summarise(rows, HEADLINE)
    fig = Figure(figsize=(4, 3))
    canvas = FigureCanvasAgg(fig)
    ax = fig.subplots()
    _panel(ax, HEADLINE[3], [("q", "g"), ("lin", "g")], summary, [], {"g": (0.1, 0.2, 0.5)})  # lin has no retrieval
    canvas.draw()
    [label] = [t for t in ax.texts if "not scored" in t.get_text()]
    renderer = canvas.get_renderer()
    assert label.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x0 + 3  # not over the spine


def test_the_seed_spread_is_the_sample_standard_deviation():
    """Two seeds scoring 66.7 and 50: sd sqrt(2) * 8.33 = 11.8 (n - 1), not the population 8.3."""
    rows = {"q": [_result(0, 3, True), _result(1, 2, True)]}
    cell = summarise(rows, HEADLINE)["q"]["VQA %"]
    assert cell["seed_std"] == pytest.approx(statistics.stdev([200 / 3, 50.0]))


def test_an_unscored_last_row_is_inside_the_panel():
    """Only the first row retrieves: the panel used to span its bar alone, so the last row's name and
    "not scored" sat on the panel's bottom edge."""
    from matplotlib.figure import Figure

    rows = {"q": [_result(0, 3, True)], "lin": [_result(0, 2, False)], "mlp": [_result(0, 2, False)]}
    ax = Figure(figsize=(4, 3)).subplots()
    _panel(ax, HEADLINE[3], [("q", "g"), ("lin", "g"), ("mlp", "g")], summarise(rows, HEADLINE), [], {"g": (0.1, 0.2, 0.5)})
    low, high = ax.get_ylim()
    assert low < -0.4 and high > 2.4  # rows sit at 2 (q), 1 and 0 (mlp), each with room around it
