"""PNG plots of the scenarios' :class:`~benchmarks.core.Series`, drawn with matplotlib.

A scenario that fills no series (one that does not sweep, e.g.
``runtime-rps`` alone) still gets one plot: its summary, a bar per subject
and backend of each figure in its tables (req/s and p99 of load-generator
rows, every measure), median with the min-max spread (:func:`draw_summary`).

matplotlib is optional (``make`` installs it with the ``dev`` extra;
otherwise ``pip install -e '.[bench]'``): without it :func:`missing` says
why and :func:`draw_all` draws nothing. The Agg backend draws without a
display; each plot is its own ``Figure`` (no pyplot global state).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .core import ScenarioResult, Series, Spread

__all__ = ["Plot", "draw", "draw_all", "draw_summary", "missing"]

INSTALL_HINT = "pip install -e '.[bench]'"


def missing() -> str | None:
    """Why plots cannot be drawn (``None``: matplotlib is importable)."""
    try:
        import matplotlib
    except ImportError:
        return f"matplotlib is not installed ({INSTALL_HINT})"
    matplotlib.use("Agg")
    return None


@dataclass(frozen=True)
class Plot:
    """A drawn plot: which scenario and series, and its path relative to the report directory."""

    scenario: str
    series: Series
    filename: str


PLOTS_DIR = "plots"
"""Sub-directory of the report directory the PNG files go into."""


def _filename(scenario: str, name: str) -> str:
    return f"{PLOTS_DIR}/" + re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{scenario}-{name}") + ".png"


def _tick(value: float, _position: float | None = None) -> str:
    """``1``, ``256``, ``1,000,000``, ``0.5``."""
    return f"{value:,.0f}" if value >= 1 and value == int(value) else f"{value:g}"


def draw(series: Series, path: Path, *, scenario: str) -> None:
    """Draw ``series`` into the PNG file ``path`` (matplotlib must be importable)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogFormatter, NullFormatter

    figure = Figure(figsize=(8, 4.8), dpi=100, layout="constrained")
    axes = figure.subplots()
    palette = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    colours: dict[str, str] = {}
    xs_seen: set[float] = set()
    for line in series.lines:
        if not line.points:
            continue
        points = sorted(line.points, key=lambda p: p.x)
        group = line.group or line.label
        colour = colours.setdefault(group, palette[len(colours) % len(palette)])
        xs = [p.x for p in points]
        ys = [p.y for p in points]
        xs_seen.update(xs)
        has_spread = all(p.low is not None and p.high is not None for p in points)
        yerr = None
        if has_spread:
            yerr = [
                [max(0.0, p.y - (p.low or p.y)) for p in points],
                [max(0.0, (p.high or p.y) - p.y) for p in points],
            ]
        axes.errorbar(
            xs,
            ys,
            yerr=yerr,
            label=line.label,
            color=colour,
            linestyle="--" if line.dashed else "-",
            marker="o",
            markersize=4,
            capsize=3 if has_spread else 0,
        )
    if series.x_log:
        axes.set_xscale("log")
    if series.y_log:
        axes.set_yscale("log")
        # Plain numbers (60, not 6 x 10^1), minor ones only where the range is small.
        axes.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        axes.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    if series.x_log and 0 < len(xs_seen) <= 12:
        axes.set_xticks(sorted(xs_seen))  # ticks at the measured levels: 1, 4, 16, ...
        axes.xaxis.set_major_formatter(FuncFormatter(_tick))
        axes.xaxis.set_minor_formatter(NullFormatter())
    if not series.y_log:
        axes.set_ylim(bottom=0)
    axes.set_title(f"{scenario}: {series.title}", fontsize="medium")
    axes.set_xlabel(series.x_label)
    axes.set_ylabel(series.y_label)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize="small", loc="best")
    figure.savefig(path, format="png")


SUMMARY = Series("summary", "medians per subject (bars: min-max)", "", "")
"""Stands for the summary plot of a scenario without series (its name and title)."""

_MAX_PANELS = 8
"""At most this many figures in one summary plot (the tables have them all)."""


def _panels(result: ScenarioResult) -> list[tuple[str, list[tuple[str, Spread]]]]:
    """``(title, [(bar label, value), ...])`` for each figure of ``result``'s tables."""
    levels = {row.concurrency for row in result.rows}

    def row_label(backend: str, subject: str, concurrency: int | None) -> str:
        label = f"{backend} {subject}"
        return f"{label} @{concurrency}" if len(levels) > 1 and concurrency else label

    panels: list[tuple[str, list[tuple[str, Spread]]]] = []
    if result.rows:
        labelled = [(row_label(r.backend, r.subject, r.concurrency), r) for r in result.rows]
        panels.append(("req/s", [(label, r.rps) for label, r in labelled]))
        panels.append(("p99 ms", [(label, r.p99) for label, r in labelled]))
    by_metric: dict[tuple[str, str], list[tuple[str, Spread]]] = {}
    for m in result.measures:
        by_metric.setdefault((m.metric, m.unit), []).append((f"{m.backend} {m.subject}", m.value))
    panels += [
        (f"{metric} ({unit})" if unit else metric, bars)
        for (metric, unit), bars in by_metric.items()
    ]
    return panels[:_MAX_PANELS]


def draw_summary(result: ScenarioResult, path: Path) -> bool:
    """Draw ``result``'s figures as bars into the PNG file ``path``; False if it has none."""
    panels = _panels(result)
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    heights = [0.9 + 0.32 * len(bars) for _, bars in panels]
    figure = Figure(figsize=(8, sum(heights) + 0.6), dpi=100, layout="constrained")
    axes_list = figure.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0]
    colour = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"][0]
    for axes, (title, bars) in zip(axes_list, panels, strict=True):
        labels = [label for label, _ in bars]
        medians = [value.median for _, value in bars]
        spread = [
            [max(0.0, v.median - v.min) for _, v in bars],
            [max(0.0, v.max - v.median) for _, v in bars],
        ]
        positions = list(range(len(bars)))
        axes.barh(positions, medians, xerr=spread, color=colour, alpha=0.8, capsize=3)
        axes.set_yticks(positions, labels, fontsize="small")
        axes.invert_yaxis()  # the tables' order, top to bottom
        axes.set_xlim(left=0)
        axes.set_title(title, fontsize="medium", loc="left")
        axes.grid(True, axis="x", alpha=0.3)
    figure.suptitle(f"{result.name}: {SUMMARY.title}", fontsize="medium")
    figure.savefig(path, format="png")
    return True


def draw_all(results: Sequence[ScenarioResult], directory: Path) -> list[Plot]:
    """Draw every non-empty series of ``results`` into ``directory``; the plots drawn.

    A result with no series to draw gets its summary (:func:`draw_summary`)
    instead, so every scenario with figures has a plot. Nothing when
    matplotlib is missing (see :func:`missing`).
    """
    if missing() is not None:
        return []
    (directory / PLOTS_DIR).mkdir(parents=True, exist_ok=True)
    plots: list[Plot] = []
    for result in results:
        drawn = False
        for series in result.series:
            if series.empty:
                continue
            filename = _filename(result.name, series.name)
            draw(series, directory / filename, scenario=result.name)
            plots.append(Plot(result.name, series, filename))
            drawn = True
        if not drawn:
            filename = _filename(result.name, SUMMARY.name)
            if draw_summary(result, directory / filename):
                plots.append(Plot(result.name, SUMMARY, filename))
    return plots
