"""Results as Markdown tables (console, ``RESULTS.md``), PNG plots and JSON."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import plots
from .core import Measure, Row, ScenarioResult, Spread

__all__ = ["markdown", "measures_table", "table", "write_json", "write_report"]

_HEADER = (
    "| scenario | backend | subject | conns | req/s (min-max) | p50 ms | p99 ms (min-max) "
    "| req/s ratio | p99 ratio | target | CPU % server / loadgen / other | errors |"
)


def _spread(value: Spread, digits: int) -> str:
    return f"{value.median:.{digits}f} ({value.min:.{digits}f}-{value.max:.{digits}f})"


def _ratio(value: float | None, ok: bool) -> str:
    if value is None:
        return ""
    return f"{value:.2f}" if ok else f"**{value:.2f}**"


def _row(row: Row) -> str:
    verdict = row.meets_targets
    target = ""
    rps_ok = row.rps_ok is not False
    p99_ok = row.p99_ok is not False
    if verdict is not None and row.targets is not None:
        target = f"{'ok' if verdict else 'MISS'} ({row.targets.describe()})"
    server = "-" if row.server_cpu is None else f"{row.server_cpu:.0f}"
    other = "-" if row.other_cpu_max is None else f"{row.other_cpu_max:.0f}"
    cells = [
        row.scenario,
        row.backend,
        row.subject,
        "" if row.concurrency is None else str(row.concurrency),
        _spread(row.rps, 0),
        f"{row.p50.median:.2f}",
        _spread(row.p99, 2),
        _ratio(row.rps_ratio, rps_ok),
        _ratio(row.p99_ratio, p99_ok),
        target,
        f"{server} / {row.loadgen_cpu_max:.0f} / {other}",
        str(row.errors),
    ]
    return "| " + " | ".join(cells) + " |"


def table(results: list[ScenarioResult]) -> str:
    """The Markdown tables: load-generator rows, then other measures (if any)."""
    rows = [_row(row) for result in results for row in result.rows]
    parts = []
    if rows:
        parts.append("\n".join([_HEADER, "|" + "---|" * _HEADER.count(" | ") + "---|", *rows]))
    measures = [m for result in results for m in result.measures]
    if measures:
        parts.append(measures_table(measures))
    return "\n\n".join(parts)


_MEASURE_HEADER = (
    "| scenario | backend | subject | metric | median (min-max) | n | ratio to baseline | target |"
)


def _number(value: float, digits: int) -> str:
    return f"{value:,.{digits}f}"


def _measure(m: Measure) -> str:
    value = m.value
    spread = (
        f"{_number(value.median, m.digits)} {m.unit} "
        f"({_number(value.min, m.digits)}-{_number(value.max, m.digits)})"
    )
    ratio = "" if m.ratio is None else f"{m.ratio:.2f}x {m.baseline}"
    verdict = m.meets_target
    target = ""
    if m.target is not None:
        word = "?" if verdict is None else ("ok" if verdict else "**MISS**")
        target = f"{word} ({m.target.describe(m.unit)})"
    cells = [m.scenario, m.backend, m.subject, m.metric, spread, str(m.repetitions), ratio, target]
    return "| " + " | ".join(cells) + " |"


def measures_table(measures: list[Measure]) -> str:
    """The Markdown table of figures that are not load-generator results."""
    lines = [_MEASURE_HEADER, "|" + "---|" * _MEASURE_HEADER.count(" | ") + "---|"]
    lines += [_measure(m) for m in measures]
    return "\n".join(lines)


def _machine(machine: dict[str, Any]) -> str:
    memory = machine.get("memory_bytes")
    text = f"{machine['cpu_count']} CPUs ({machine['cpu_model']})"
    if memory:
        text += f", {memory / 2**30:.0f} GiB"
    return f"{text}, {machine.get('kernel') or machine['platform']}, Python {machine['python']}"


def _plots_section(drawn: list[plots.Plot], plot_note: str | None) -> list[str]:
    if plot_note is not None:
        return ["", f"Plots not drawn: {plot_note}."]
    if not drawn:
        return []
    lines = ["", "## Plots"]
    for plot in drawn:
        lines += ["", f"![{plot.scenario}: {plot.series.title}]({plot.filename})"]
    return lines


_READING = (
    "Reading the target column: `ok` means the row met the target named after it in this "
    "run, `MISS` that it did not, `?` that it could not be judged (no baseline figure). "
    "Targets are ratios to the baseline measured next to the subject (`req/s >= 0.90x`: "
    "at least 0.9 times the baseline's req/s; `p99 <= 1.50x`: a p99 latency at most 1.5 "
    "times the baseline's) or absolute bounds (`<= 4,096 B`); a baseline row has none. "
    "A MISS is a finding, not a failed run: only errors (failed requests, a subject that "
    "served none) make the run exit non-zero."
)
"""How to read ``ok``/``MISS`` in the tables (the report's header)."""


def markdown(
    results: list[ScenarioResult],
    meta: dict[str, Any],
    *,
    drawn: list[plots.Plot] | None = None,
    plot_note: str | None = None,
) -> str:
    """A small Markdown document: the tables, how it was made, plots, notes.

    ``drawn``: PNG files next to the document, linked from it; ``plot_note``:
    why there are none.
    """
    machine = meta["machine"]
    config = meta["config"]
    mode = "full" if config.get("full") else "quick" if config.get("quick") else "default"
    parts = [
        "# Benchmark results",
        "",
        f"Command: `{meta['command']}`  ",
        f"Started: {meta['started']}"
        + (f", took {meta['seconds']:.0f} s" if "seconds" in meta else "")
        + "  ",
        f"Machine: {_machine(machine)}  ",
        "Packages: "
        + ", ".join(f"{k} {v}" for k, v in meta["packages"].items() if v is not None)
        + "  ",
        f"Load ({mode}): {config['connections']} keep-alive connections unless a row says "
        f"otherwise, {config['warmup']:g} s warm-up, {config['duration']:g} s measured, "
        f"{config['repetitions']} repetition(s); median shown, (min-max) over repetitions.",
        "",
        _READING,
        "",
        table(results),
        "",
        "Ratios are subject / baseline medians on the same backend (and at the same "
        "concurrency) in the same run; each row's target is named in its target cell "
        "(ratio misses in **bold**). CPU: server median, load generator max, other "
        "processes max, in % of one core over the measured window; n: repetitions; "
        "conns: concurrent keep-alive connections of the load generator.",
    ]
    parts += _plots_section(drawn or [], plot_note)
    notes = [f"- {r.name}: {note}" for r in results for note in r.notes]
    if notes:
        parts += ["", "Notes:", "", *notes]
    return "\n".join(parts) + "\n"


def write_report(directory: Path, results: list[ScenarioResult], meta: dict[str, Any]) -> Path:
    """Write ``RESULTS.md`` and its PNG plots into ``directory``; return its path.

    Without matplotlib the document says so instead of linking plots
    (:func:`benchmarks.plots.missing`).
    """
    directory.mkdir(parents=True, exist_ok=True)
    note = plots.missing()
    drawn = plots.draw_all(results, directory) if note is None else []
    path = directory / "RESULTS.md"
    path.write_text(markdown(results, meta, drawn=drawn, plot_note=note), encoding="utf-8")
    return path


def write_json(path: Path, results: list[ScenarioResult], meta: dict[str, Any]) -> None:
    """Everything: metadata, per-scenario settings, rows and raw samples."""
    payload = {
        **meta,
        "scenarios": [
            {
                "name": r.name,
                "settings": r.settings,
                "notes": r.notes,
                "failures": r.failures,
                "rows": [{**asdict(row), "meets_targets": row.meets_targets} for row in r.rows],
                "measures": [{**asdict(m), "meets_target": m.meets_target} for m in r.measures],
                "series": [asdict(s) for s in r.series],
                "samples": r.samples,
            }
            for r in results
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
