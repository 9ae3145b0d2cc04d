"""Shared types: run configuration, progress line, samples summarised into rows."""

from __future__ import annotations

import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

__all__ = ["Progress", "Row", "RunConfig", "ScenarioResult", "Spread", "Targets", "summarize"]


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
    max_p99_ratio: float = 1.5


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
        if self.targets is None or self.rps_ratio is None or self.p99_ratio is None:
            return None
        return (
            self.rps_ratio >= self.targets.min_rps_ratio
            and self.p99_ratio <= self.targets.max_p99_ratio
        )


@dataclass
class ScenarioResult:
    """Rows for the table, raw samples and notes for the JSON file."""

    name: str
    rows: list[Row]
    samples: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


def summarize(
    scenario: str,
    samples: Sequence[Mapping[str, Any]],
    *,
    baseline: str,
    targets: Targets,
) -> list[Row]:
    """Group samples by (backend, subject); ratios are to the same backend's baseline.

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
