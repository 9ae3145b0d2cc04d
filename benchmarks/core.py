"""Shared types: run configuration, progress line, samples summarised into rows."""

from __future__ import annotations

import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "Bound",
    "Measure",
    "Metric",
    "Progress",
    "Row",
    "RunConfig",
    "ScenarioResult",
    "Spread",
    "Targets",
    "summarize",
    "summarize_measures",
]


@dataclass
class RunConfig:
    """Settings common to all scenarios (``--quick`` picks the short ones)."""

    quick: bool = False
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

    @classmethod
    def make(cls, *, quick: bool, **overrides: Any) -> RunConfig:
        """Defaults for a full or a quick run, then the non-``None`` overrides."""
        base = cls(quick=True, repetitions=1, warmup=1.0, duration=2.0) if quick else cls()
        for key, value in overrides.items():
            if value is not None:
                setattr(base, key, value)
        return base

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        data = asdict(self)
        data["workdir"] = str(self.workdir)
        data["backends"] = list(self.backends)
        return data


class Progress:
    """``[3/12] label ... result`` lines on stderr."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.index = 0
        self.stream = stream or sys.stderr

    def start(self, label: str) -> None:
        """Announce the next step."""
        self.index += 1
        self.stream.write(f"[{self.index}/{self.total}] {label} ... ")
        self.stream.flush()

    def finish(self, text: str) -> None:
        """End the current step's line."""
        self.stream.write(text + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A line of its own."""
        self.stream.write(text + "\n")
        self.stream.flush()


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


def summarize(
    scenario: str,
    samples: Sequence[Mapping[str, Any]],
    *,
    baseline: str,
    targets: Targets | None,
) -> list[Row]:
    """Group samples by (backend, subject); ratios are to the same backend's baseline.

    ``targets=None``: ratios are reported, nothing is judged.

    Each sample holds ``backend``, ``subject`` and a loadgen ``result``.
    """
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for sample in samples:
        groups.setdefault((sample["backend"], sample["subject"]), []).append(sample)
    rows: list[Row] = []
    for (backend, subject), group in groups.items():
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
            )
        )
    bases = {row.backend: row for row in rows if row.subject == baseline}
    for row in rows:
        base = bases.get(row.backend)
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
