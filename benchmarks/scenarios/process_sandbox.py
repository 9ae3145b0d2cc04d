"""``process-sandbox``: how long creating a process sandbox takes.

``ProcessSandboxProvider.create()`` on the process hello template
(``benchmarks/templates/hello_process``), timed from the call until it
returns a started sandbox, then the sandbox is pinged and closed (not
timed). Subjects: ``warm`` (warm pool of 2; before each create, every
pooled process answers ``/ping`` on a connection of the probe's own, so the
pool is ready), ``cold`` (no pool: spawn, import, listen, ``/ping``) and the
baseline ``python -c pass`` (``subprocess.run``: the floor of starting any
Python process). Target: warm-pool creation p50 <= 5 ms.

Runs on every backend (the provider's event loop: uvloop on asyncio, and
trio; ``python -c pass`` is measured on each too, as that backend's
baseline), unpinned: sandbox processes inherit the probe's CPU affinity,
and pinning everything to one CPU would measure that CPU's contention
instead.
"""

from __future__ import annotations

from typing import Any

from ..core import Bound, Metric, Progress, RunConfig, ScenarioResult, summarize_measures
from . import register
from ._probes import run_probe

__all__ = ["ProcessSandbox"]

TARGET_MS = 5.0
SUBJECTS = ("python -c pass", "warm", "cold")
BASELINE = "python -c pass"
METRICS = (
    Metric(
        "p50_ms",
        "creation p50",
        "ms",
        digits=2,
        target=Bound("<=", TARGET_MS),
        target_subjects=("warm",),
    ),
    Metric("p99_ms", "creation p99 (max when n < 100)", "ms", digits=2),
    Metric("mean_ms", "creation mean", "ms", digits=2),
)


def _count(config: RunConfig, subject: str) -> int:
    """Creations per measurement."""
    quick = {"python -c pass": 5, "warm": 5, "cold": 3}
    full = {"python -c pass": 30, "warm": 30, "cold": 15}
    return (quick if config.quick else full)[subject]


class ProcessSandbox:
    """The ``process-sandbox`` scenario."""

    name = "process-sandbox"
    description = (
        "process sandbox creation p50/p99: warm pool (2) vs cold vs `python -c pass` baseline"
    )

    def steps(self, config: RunConfig) -> int:
        """One step per (backend, repetition, subject)."""
        return len(config.backends) * config.repetitions * len(SUBJECTS)

    def run(self, config: RunConfig, progress: Progress) -> ScenarioResult:
        """Alternate the subjects within each repetition, on every backend."""
        samples: list[dict[str, Any]] = []
        runs = [(b, r) for b in config.backends for r in range(1, config.repetitions + 1)]
        for backend, rep in runs:
            for subject in SUBJECTS:
                count = _count(config, subject)
                progress.start(f"{self.name} {backend} {subject} x{count} rep {rep}")
                probe = "python" if subject == BASELINE else subject
                args = ["sandbox", "--backend", backend, "--subject", probe]
                args += ["--count", str(count)]
                result = run_probe(args, config, cpus=None, timeout=60.0 + 5.0 * count)
                progress.finish(
                    f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms "
                    f"(n={result['count']})"
                )
                samples.append(
                    {
                        "backend": backend,
                        "subject": subject,
                        "repetition": rep,
                        "metrics": {k: result[k] for k in ("p50_ms", "p99_ms", "mean_ms")},
                        "result": result,
                    }
                )
        measures = summarize_measures(self.name, samples, METRICS, baseline=BASELINE)
        counts = {s: _count(config, s) for s in SUBJECTS}
        return ScenarioResult(
            name=self.name,
            rows=[],
            samples=samples,
            notes=[
                f"creations per measurement: {counts}; the first sandbox create of each "
                "measurement is not counted (one-time set-up); not pinned",
                "warm: the time includes launching the pool's replacement process "
                "(create() waits for that launch: template copy + fork/exec)",
            ],
            settings={
                "backends": list(config.backends),
                "warm_pool": 2,
                "counts": counts,
                "targets": {"max_warm_p50_ms": TARGET_MS},
            },
            measures=measures,
        )


register(ProcessSandbox())
