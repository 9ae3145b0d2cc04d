"""``idle-sessions``: resident memory per idle in-process session.

Each measurement is a fresh process pinned to the server CPU (see
``benchmarks/inproc.py idle``): ``gc.collect()``, RSS, create N sessions,
``gc.collect()``, RSS; (RSS delta) / N at N = 10,000 and 100,000 (10,000
only with ``--quick``). Subjects: ``orchestrator`` (sessions created with
``Orchestrator.create_session`` on the in-process hello template, never
used), ``orchestrator-used`` (each also ran one turn, then every actor
passivated), and the baseline ``anyio-task`` (a bare task waiting on its own
memory object stream). Target: <= 4 KB (4,096 B) per idle orchestrator
session, used or not.

One more run per subject and backend at 10,000 traces the creation with
``tracemalloc``: live and peak Python heap bytes per session, which tells
memory still in use from allocator high-water marks.
"""

from __future__ import annotations

from typing import Any

from .. import procs
from ..core import Bound, Metric, Progress, RunConfig, ScenarioResult, summarize_measures
from . import register
from ._probes import run_probe

__all__ = ["IdleSessions"]

TARGET_BYTES = 4096.0
SUBJECTS = ("anyio-task", "orchestrator", "orchestrator-used")
BASELINE = "anyio-task"
HEAP_COUNT = 10_000


def _counts(config: RunConfig) -> tuple[int, ...]:
    return (10_000,) if config.quick else (10_000, 100_000)


def _repetitions(config: RunConfig, count: int) -> int:
    """RSS per session varies little between runs: 100,000 is measured once."""
    return config.repetitions if count <= 10_000 else 1


def _metrics(counts: tuple[int, ...]) -> list[Metric]:
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
        Metric("heap", f"heap bytes/session @{HEAP_COUNT:,} (tracemalloc, live)", "B"),
        Metric("heap_peak", f"heap bytes/session @{HEAP_COUNT:,} (tracemalloc, peak)", "B"),
    ]
    return metrics


class IdleSessions:
    """The ``idle-sessions`` scenario."""

    name = "idle-sessions"
    description = (
        "RSS bytes per idle in-process session at 10k/100k (fresh and after one turn) "
        "vs a bare anyio task waiting on its own stream"
    )

    def steps(self, config: RunConfig) -> int:
        """RSS runs per (backend, count, repetition, subject), plus one heap run each."""
        per_backend = sum(_repetitions(config, n) for n in _counts(config)) + 1
        return len(config.backends) * per_backend * len(SUBJECTS)

    def run(self, config: RunConfig, progress: Progress) -> ScenarioResult:
        """Every measurement in a fresh process."""
        pinning = procs.plan_pinning(config.pin)
        counts = _counts(config)
        samples: list[dict[str, Any]] = []
        for backend in config.backends:
            for count in counts:
                for rep in range(1, _repetitions(config, count) + 1):
                    for subject in SUBJECTS:
                        result = self._probe(config, progress, pinning, backend, subject, count)
                        progress.finish(
                            f"{result['bytes_per_session']:,.0f} B/session RSS, "
                            f"{result['blocks_per_session']:.1f} blocks/session"
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
            for subject in SUBJECTS:
                result = self._probe(
                    config, progress, pinning, backend, subject, HEAP_COUNT, heap=True
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
                        "count": HEAP_COUNT,
                        "metrics": {
                            "heap": result["heap_bytes_per_session"],
                            "heap_peak": result["heap_peak_bytes_per_session"],
                        },
                        "result": result,
                    }
                )
        measures = summarize_measures(self.name, samples, _metrics(counts), baseline=BASELINE)
        notes = [
            "RSS delta / count after gc.collect(), one fresh process per measurement, "
            f"pinned {pinning.to_json()}; 100,000 sessions measured once per subject",
            "orchestrator-used: the first turns run back to back and each actor passivates "
            "5 s after its turn, so the actors of the last 5 s of turns are alive together "
            "(all N at 10,000); RSS keeps that high-water mark, the tracemalloc rows show "
            "what stays allocated",
        ]
        return ScenarioResult(
            name=self.name,
            rows=[],
            samples=samples,
            notes=notes,
            settings={
                "counts": list(counts),
                "heap_count": HEAP_COUNT,
                "targets": {"max_bytes_per_session": TARGET_BYTES},
                "pinning": pinning.to_json(),
            },
            measures=measures,
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
        return run_probe(args, config, cpus=pinning.server, timeout=300.0)


register(IdleSessions())
