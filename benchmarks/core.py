"""Shared types: run configuration, samples summarised into rows, series to plot.

The progress bar lives in :mod:`benchmarks.progress` (``Progress`` is
re-exported here, where scenarios have always imported it from).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .progress import Progress

__all__ = [
    "Bound",
    "Line",
    "Measure",
    "Metric",
    "Point",
    "Progress",
    "Row",
    "RunConfig",
    "ScenarioResult",
    "Series",
    "Spread",
    "Targets",
    "concurrency_series",
    "summarize",
    "summarize_measures",
]


@dataclass
class RunConfig:
    """Settings common to all scenarios (``--quick`` picks the short ones)."""

    quick: bool = False
    full: bool = False
    """Also the very long or very big cases (``--full``: e.g. 1,000,000 idle sessions)."""
    repetitions: int = 3
    connections: int = 64
    warmup: float = 2.0
    duration: float = 5.0
    backends: tuple[str, ...] = ("asyncio", "trio")
    pin: bool = True
    startup_timeout: float = 30.0
    stop_timeout: float = 10.0
    workdir: Path = field(default_factory=Path)
    """Where server logs go (a temporary directory during a run)."""
    levels: tuple[int, ...] | None = None
    """Concurrency levels of the sweeping scenarios (``None``: each its own)."""

    def sweep(self, full: Sequence[int], quick: Sequence[int]) -> tuple[int, ...]:
        """The concurrency levels to sweep: ``--concurrency``, else ``quick`` or ``full``."""
        if self.levels:
            return tuple(self.levels)
        return tuple(quick if self.quick else full)

    @classmethod
    def make(cls, *, quick: bool, **overrides: Any) -> RunConfig:
        """Defaults for a full or a quick run, then the non-``None`` overrides."""
        base = cls(quick=True, repetitions=1, warmup=0.3, duration=0.7) if quick else cls()
        for key, value in overrides.items():
            if value is not None:
                setattr(base, key, value)
        return base

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        data = asdict(self)
        data["workdir"] = str(self.workdir)
        data["backends"] = list(self.backends)
        data["levels"] = None if self.levels is None else list(self.levels)
        return data


@dataclass(frozen=True)
class Spread:
    """Median, min and max of repeated measurements."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        """Summarise ``values`` (at least one)."""
        data = list(values)
        return cls(statistics.median(data), min(data), max(data))


@dataclass(frozen=True)
class Targets:
    """Acceptance bounds on a subject relative to its baseline."""

    min_rps_ratio: float = 0.9
    max_p99_ratio: float | None = 1.5
    """``None``: p99 is reported, not judged."""

    def describe(self) -> str:
        """``req/s >= 0.90x, p99 <= 1.50x`` (ratios to the baseline)."""
        text = f"req/s >= {self.min_rps_ratio:.2f}x"
        if self.max_p99_ratio is not None:
            text += f", p99 <= {self.max_p99_ratio:.2f}x"
        return text


@dataclass
class Row:
    """One line of the results table: a subject on a backend, over repetitions."""

    scenario: str
    backend: str
    subject: str
    repetitions: int
    rps: Spread
    p50: Spread
    p99: Spread
    errors: int
    loadgen_cpu_max: float
    server_cpu: float | None
    other_cpu_max: float | None = None
    """CPU % used by other processes during the measured windows (noise)."""
    rps_ratio: float | None = None
    p99_ratio: float | None = None
    targets: Targets | None = None
    concurrency: int | None = None
    """Concurrent connections (sessions) of the load generator, when known."""

    @property
    def meets_targets(self) -> bool | None:
        """``None`` for a baseline row."""
        if self.targets is None or self.rps_ratio is None:
            return None
        return self.rps_ok is not False and self.p99_ok is not False

    @property
    def rps_ok(self) -> bool | None:
        """Whether req/s meets its target (``None``: no target)."""
        if self.targets is None or self.rps_ratio is None:
            return None
        return self.rps_ratio >= self.targets.min_rps_ratio

    @property
    def p99_ok(self) -> bool | None:
        """Whether p99 meets its target (``None``: no target)."""
        if self.targets is None or self.targets.max_p99_ratio is None or self.p99_ratio is None:
            return None
        return self.p99_ratio <= self.targets.max_p99_ratio


@dataclass(frozen=True)
class Bound:
    """A target: ``value >= limit`` or ``value <= limit``, on the value or its ratio."""

    op: str
    """``">="`` or ``"<="``."""
    limit: float
    on: str = "value"
    """``"value"`` (absolute, in the metric's unit) or ``"ratio"`` (to the baseline)."""

    def check(self, value: float, ratio: float | None) -> bool | None:
        """Whether ``value`` (or ``ratio``) is within the bound; ``None``: cannot tell."""
        x = value if self.on == "value" else ratio
        if x is None:
            return None
        return x >= self.limit if self.op == ">=" else x <= self.limit

    def describe(self, unit: str) -> str:
        """``>= 20,000 /s`` or ``ratio >= 0.70``."""
        if self.on == "ratio":
            return f"ratio {self.op} {self.limit:g}"
        return f"{self.op} {self.limit:,g} {unit}".rstrip()


@dataclass(frozen=True)
class Metric:
    """One figure a scenario measures, read from ``sample["metrics"][key]``."""

    key: str
    label: str
    unit: str
    digits: int = 0
    target: Bound | None = None
    target_subjects: tuple[str, ...] | None = None
    """Subjects the target applies to (``None``: every subject but the baseline)."""


@dataclass
class Measure:
    """One line of a scenario's figures table: a metric of a subject on a backend."""

    scenario: str
    backend: str
    subject: str
    metric: str
    unit: str
    value: Spread
    repetitions: int
    digits: int = 0
    baseline: str | None = None
    """The subject the ratio is to (same backend, same metric)."""
    ratio: float | None = None
    target: Bound | None = None

    @property
    def meets_target(self) -> bool | None:
        """``None`` when no target applies."""
        if self.target is None:
            return None
        return self.target.check(self.value.median, self.ratio)


@dataclass
class ScenarioResult:
    """Rows for the tables, raw samples and notes for the JSON file.

    ``rows`` are load-generator results (req/s, p50, p99); ``measures`` are
    any other figures (creations/s, bytes per session, start-up latency).
    """

    name: str
    rows: list[Row]
    samples: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    measures: list[Measure] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    """Samples that had errors (the run exits non-zero)."""
    series: list[Series] = field(default_factory=list)
    """Plots for the report (PNG files next to it; see :class:`Series`)."""


@dataclass(frozen=True)
class Point:
    """One point of a line: ``y`` at ``x``, with its spread (``low``-``high``) if known."""

    x: float
    y: float
    low: float | None = None
    high: float | None = None


@dataclass
class Line:
    """The points of one subject (on one backend) in a :class:`Series`."""

    label: str
    points: list[Point] = field(default_factory=list)
    dashed: bool = False
    group: str | None = None
    """Lines of the same group share a colour (e.g. a subject's p50 and p99)."""

    def add(self, x: float, y: float, low: float | None = None, high: float | None = None) -> None:
        """Append a point."""
        self.points.append(Point(x, y, low, high))


@dataclass
class Series:
    """One plot of a scenario: a line per subject and backend over a shared x axis.

    A scenario fills ``ScenarioResult.series``; the report draws each as
    ``<scenario>-<name>.png`` (when matplotlib is installed) and links it::

        plot = Series("memory", "RSS vs idle sessions", "sessions", "MiB", x_log=True)
        plot.line("asyncio orchestrator").add(10_000, 10.2)
        plot.line("asyncio orchestrator").add(100_000, 111.0)
    """

    name: str
    """Short, file-name safe: ``throughput``, ``latency``, ``memory``."""
    title: str
    x_label: str
    y_label: str
    x_log: bool = False
    y_log: bool = False
    lines: list[Line] = field(default_factory=list)

    def line(self, label: str, *, dashed: bool = False, group: str | None = None) -> Line:
        """The line called ``label``, created (with ``dashed`` and ``group``) if new."""
        for line in self.lines:
            if line.label == label:
                return line
        line = Line(label, dashed=dashed, group=group)
        self.lines.append(line)
        return line

    @property
    def empty(self) -> bool:
        """Whether there is no point to draw."""
        return not any(line.points for line in self.lines)


def concurrency_series(
    rows: Sequence[Row], *, what: str = "req/s", unit: str = "request"
) -> list[Series]:
    """Throughput and latency (p50 dashed, p99 solid) against concurrency.

    One line per (backend, subject) over the rows' ``concurrency``; rows
    without one are left out. ``what`` labels the throughput axis.
    """
    throughput = Series(
        "throughput",
        f"{what} vs concurrency (median, min-max bars)",
        "concurrent connections",
        what,
        x_log=True,
    )
    latency = Series(
        "latency",
        "latency percentiles vs concurrency (p50 dashed, p99 solid)",
        "concurrent connections",
        f"{unit} latency, ms",
        x_log=True,
        y_log=True,
    )
    for row in sorted(rows, key=lambda r: (r.backend, r.subject, r.concurrency or 0)):
        if row.concurrency is None:
            continue
        label = f"{row.backend} {row.subject}"
        rps = row.rps
        throughput.line(label).add(row.concurrency, rps.median, rps.min, rps.max)
        p99 = row.p99
        latency.line(f"{label} p99", group=label).add(row.concurrency, p99.median, p99.min, p99.max)
        p50 = row.p50
        latency.line(f"{label} p50", dashed=True, group=label).add(
            row.concurrency, p50.median, p50.min, p50.max
        )
    return [s for s in (throughput, latency) if not s.empty]


def summarize(
    scenario: str,
    samples: Sequence[Mapping[str, Any]],
    *,
    baseline: str,
    targets: Targets | None,
) -> list[Row]:
    """Group samples by (backend, subject); ratios are to the same backend's baseline.

    ``targets=None``: ratios are reported, nothing is judged.

    Each sample holds ``backend``, ``subject`` and a loadgen ``result``, and
    may hold ``concurrency`` (else the result's ``connections`` is taken):
    rows are per concurrency too, and ratios are to the baseline at the same
    concurrency.
    """
    groups: dict[tuple[str, str, int | None], list[Mapping[str, Any]]] = {}
    for sample in samples:
        level = sample.get("concurrency", sample["result"].get("connections"))
        groups.setdefault((sample["backend"], sample["subject"], level), []).append(sample)
    rows: list[Row] = []
    for (backend, subject, level), group in groups.items():
        results = [s["result"] for s in group]
        server = [r["server_cpu_percent"] for r in results if r["server_cpu_percent"] is not None]
        other = [r["other_cpu_percent"] for r in results if r.get("other_cpu_percent") is not None]
        rows.append(
            Row(
                scenario=scenario,
                backend=backend,
                subject=subject,
                repetitions=len(results),
                rps=Spread.of(r["rps"] for r in results),
                p50=Spread.of(r["p50"] for r in results),
                p99=Spread.of(r["p99"] for r in results),
                errors=sum(r["errors"] for r in results),
                loadgen_cpu_max=max(r["loadgen_cpu_percent"] for r in results),
                server_cpu=statistics.median(server) if server else None,
                other_cpu_max=max(other) if other else None,
                concurrency=level,
            )
        )
    bases = {(row.backend, row.concurrency): row for row in rows if row.subject == baseline}
    for row in rows:
        base = bases.get((row.backend, row.concurrency))
        if row.subject == baseline or base is None:
            continue
        row.targets = targets
        row.rps_ratio = row.rps.median / base.rps.median if base.rps.median else None
        row.p99_ratio = row.p99.median / base.p99.median if base.p99.median else None
    return rows


def summarize_measures(
    scenario: str,
    samples: Sequence[Mapping[str, Any]],
    metrics: Sequence[Metric],
    *,
    baseline: str | None,
) -> list[Measure]:
    """One :class:`Measure` per (backend, subject, metric) found in ``samples``.

    Each sample holds ``backend``, ``subject`` and ``metrics`` (key -> number);
    ratios are medians over the same backend's ``baseline`` subject.
    """
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for sample in samples:
        groups.setdefault((sample["backend"], sample["subject"]), []).append(sample)
    out: list[Measure] = []
    for (backend, subject), group in groups.items():
        for metric in metrics:
            values = [s["metrics"][metric.key] for s in group if metric.key in s["metrics"]]
            if not values:
                continue
            applies = (
                subject != baseline
                if metric.target_subjects is None
                else subject in metric.target_subjects
            )
            out.append(
                Measure(
                    scenario=scenario,
                    backend=backend,
                    subject=subject,
                    metric=metric.label,
                    unit=metric.unit,
                    value=Spread.of(values),
                    repetitions=len(values),
                    digits=metric.digits,
                    target=metric.target if applies else None,
                )
            )
    if baseline is not None:
        bases = {(m.backend, m.metric): m for m in out if m.subject == baseline}
        for measure in out:
            base = bases.get((measure.backend, measure.metric))
            if measure.subject == baseline or base is None:
                continue
            measure.baseline = baseline
            if base.value.median:
                measure.ratio = measure.value.median / base.value.median
    return out
