"""``idle-sessions``: resident memory per idle in-process session.

Each measurement is a fresh process pinned to the server CPU (see
``benchmarks/inproc.py idle``): ``gc.collect()``, RSS, create N sessions,
``gc.collect()``, RSS; (RSS delta) / N at N = 10,000 and 100,000 (10,000
only with ``--quick``; also 1,000,000 with ``--full``: per backend about
1 GB and 20-40 s for the orchestrator's sessions, 1.8 GB and 4.5-6.5
minutes when each ran a turn, 5.5-9 GB and 2-3 minutes for the bare
tasks: about 10 minutes per backend; a count whose estimate does not fit the available
memory is skipped with a note). Subjects: ``orchestrator`` (sessions created with
``Orchestrator.create_session`` on the in-process hello template, never
used), ``orchestrator-used`` (each also ran one turn the way an HTTP request
runs it: inline in the caller's task, the session being idle, so no actor task
is started; any that was has passivated), and the baseline ``anyio-task``
(a bare task waiting on its own memory object stream). Target: <= 4 KB
(4,096 B) per idle orchestrator session, used or not.

One more run per subject and backend at 10,000 (2,000 and the
orchestrator's subjects only with ``--quick``) traces the creation with
``tracemalloc``: live and peak Python heap bytes per session, which tells
memory still in use from allocator high-water marks.

With ``--quick`` the actors passivate after 0.5 s instead of 5 s (the
probe's ``--passivate-after``), so ``orchestrator-used`` waits less.

Plots: RSS growth and RSS per session against the number of sessions.
"""

from __future__ import annotations

import statistics
from typing import Any

from .. import environment, procs
from ..core import (
    Bound,
    Metric,
    Progress,
    RunConfig,
    ScenarioResult,
    Series,
    summarize_measures,
)
from . import register
from ._probes import run_probe

__all__ = ["IdleSessions"]

TARGET_BYTES = 4096.0
SUBJECTS = ("anyio-task", "orchestrator", "orchestrator-used")
BASELINE = "anyio-task"
HEAP_COUNT = 10_000
QUICK_HEAP_COUNT = 2_000
QUICK_PASSIVATE_AFTER = 0.5
ESTIMATE_BYTES = 12_000
"""Upper estimate of RSS per session (any subject, any backend), to check a count fits."""


def _counts(config: RunConfig) -> tuple[int, ...]:
    if config.quick:
        return (10_000,)
    return (10_000, 100_000, 1_000_000) if config.full else (10_000, 100_000)


def _available_bytes() -> int | None:
    """``MemAvailable`` (Linux), ``None`` if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return environment.memory_bytes()


def _fits(count: int) -> bool:
    available = _available_bytes()
    return available is None or count * ESTIMATE_BYTES < 0.8 * available


def _repetitions(config: RunConfig, count: int) -> int:
    """RSS per session varies little between runs: 100,000 is measured once."""
    return config.repetitions if count <= 10_000 else 1


def _heap_count(config: RunConfig) -> int:
    return QUICK_HEAP_COUNT if config.quick else HEAP_COUNT


def _heap_subjects(config: RunConfig) -> tuple[str, ...]:
    """``--quick`` traces the orchestrator's sessions only, not the baseline's."""
    return tuple(s for s in SUBJECTS if s != BASELINE) if config.quick else SUBJECTS


def _metrics(counts: tuple[int, ...], heap_count: int) -> list[Metric]:
    metrics = [
        Metric(
            f"rss@{n}",
            f"RSS bytes/session @{n:,}",
            "B",
            target=Bound("<=", TARGET_BYTES),
            target_subjects=("orchestrator", "orchestrator-used"),
        )
        for n in counts
    ]
    metrics += [
        Metric("heap", f"heap bytes/session @{heap_count:,} (tracemalloc, live)", "B"),
        Metric("heap_peak", f"heap bytes/session @{heap_count:,} (tracemalloc, peak)", "B"),
    ]
    return metrics


class IdleSessions:
    """The ``idle-sessions`` scenario."""

    name = "idle-sessions"
    description = (
        "RSS bytes per idle in-process session at 10k/100k/1M with --full (fresh and after "
        "one turn) vs a bare anyio task waiting on its own stream"
    )

    def steps(self, config: RunConfig) -> int:
        """RSS runs per (backend, count, repetition, subject), plus the heap runs."""
        rss = sum(_repetitions(config, n) for n in _counts(config)) * len(SUBJECTS)
        return len(config.backends) * (rss + len(_heap_subjects(config)))

    def run(self, config: RunConfig, progress: Progress) -> ScenarioResult:
        """Every measurement in a fresh process."""
        pinning = procs.plan_pinning(config.pin)
        counts = _counts(config)
        heap_count = _heap_count(config)
        samples: list[dict[str, Any]] = []
        skipped: list[str] = []
        for backend in config.backends:
            for count in counts:
                for rep in range(1, _repetitions(config, count) + 1):
                    for subject in SUBJECTS:
                        if not _fits(count):
                            progress.start(f"{self.name} {backend} {subject} {count:,} sessions")
                            progress.finish("skipped: does not fit in the available memory")
                            skipped.append(f"{backend} {subject} @{count:,}")
                            continue
                        result = self._probe(config, progress, pinning, backend, subject, count)
                        progress.finish(
                            f"{result['bytes_per_session']:,.0f} B/session RSS, "
                            f"{result['blocks_per_session']:.1f} blocks/session, "
                            f"created in {result['seconds']:.1f} s"
                        )
                        samples.append(
                            {
                                "backend": backend,
                                "subject": subject,
                                "repetition": rep,
                                "count": count,
                                "metrics": {f"rss@{count}": result["bytes_per_session"]},
                                "result": result,
                            }
                        )
            for subject in _heap_subjects(config):
                result = self._probe(
                    config, progress, pinning, backend, subject, heap_count, heap=True
                )
                progress.finish(
                    f"{result['heap_bytes_per_session']:,.0f} B/session live heap, "
                    f"peak {result['heap_peak_bytes_per_session']:,.0f}"
                )
                samples.append(
                    {
                        "backend": backend,
                        "subject": subject,
                        "repetition": 1,
                        "count": heap_count,
                        "metrics": {
                            "heap": result["heap_bytes_per_session"],
                            "heap_peak": result["heap_peak_bytes_per_session"],
                        },
                        "result": result,
                    }
                )
        measures = summarize_measures(
            self.name, samples, _metrics(counts, heap_count), baseline=BASELINE
        )
        passivate = QUICK_PASSIVATE_AFTER if config.quick else None
        notes = [
            "RSS delta / count after gc.collect(), one fresh process per measurement, "
            f"pinned {pinning.to_json()}; 100,000 sessions and more measured once per subject",
            "orchestrator-used: the first turns run back to back, each inline in the "
            "creating task as the front door runs a turn for an idle session (no actor "
            "task); the tracemalloc rows tell what stays allocated from high-water marks",
        ]
        if passivate is not None:
            notes.append(f"--quick: actors passivate after {passivate:g} s (not 5 s)")
        largest = [s for s in samples if s["count"] == max(counts) and "heap" not in s["metrics"]]
        if largest and max(counts) > 100_000:
            took = ", ".join(
                f"{s['backend']} {s['subject']} {s['result']['seconds']:.0f} s" for s in largest
            )
            notes.append(f"creating {max(counts):,} sessions took: {took}")
        if skipped:
            notes.append(
                f"skipped (estimate {ESTIMATE_BYTES:,} B/session does not fit in 80 % of the "
                f"available memory): {', '.join(skipped)}"
            )
        return ScenarioResult(
            name=self.name,
            rows=[],
            samples=samples,
            notes=notes,
            settings={
                "counts": list(counts),
                "heap_count": heap_count,
                "passivate_after": passivate,
                "targets": {"max_bytes_per_session": TARGET_BYTES},
                "pinning": pinning.to_json(),
            },
            measures=measures,
            series=_series(samples),
        )

    def _probe(
        self,
        config: RunConfig,
        progress: Progress,
        pinning: procs.Pinning,
        backend: str,
        subject: str,
        count: int,
        *,
        heap: bool = False,
    ) -> dict[str, Any]:
        what = "heap" if heap else "RSS"
        progress.start(f"{self.name} {backend} {subject} {count:,} sessions ({what})")
        args = ["idle", "--backend", backend, "--subject", subject, "--count", str(count)]
        if heap:
            args.append("--heap")
        if config.quick:
            args += ["--passivate-after", str(QUICK_PASSIVATE_AFTER)]
        return run_probe(args, config, cpus=pinning.server, timeout=300.0 + count / 500)


def _series(samples: list[dict[str, Any]]) -> list[Series]:
    """RSS growth (MiB) and RSS per session against the number of sessions."""
    total = Series(
        "memory",
        "RSS growth vs idle sessions (trio dashed)",
        "idle sessions",
        "RSS growth, MiB",
        x_log=True,
        y_log=True,
    )
    per = Series(
        "memory-per-session",
        "RSS per idle session vs sessions (trio dashed)",
        "idle sessions",
        "RSS bytes per session",
        x_log=True,
    )
    groups: dict[tuple[str, str, int], list[float]] = {}
    for sample in samples:
        if "heap" in sample["metrics"]:
            continue
        key = (sample["backend"], sample["subject"], sample["count"])
        groups.setdefault(key, []).append(sample["result"]["bytes_per_session"])
    for (backend, subject, count), values in sorted(groups.items()):
        label, dashed = f"{backend} {subject}", backend == "trio"
        mid, low, high = statistics.median(values), min(values), max(values)
        per.line(label, dashed=dashed, group=subject).add(count, mid, low, high)
        mib = count / 2**20
        total.line(label, dashed=dashed, group=subject).add(count, mid * mib, low * mib, high * mib)
    return [s for s in (total, per) if not s.empty]


register(IdleSessions())
