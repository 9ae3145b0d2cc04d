"""``orchestrator-rps``: invocations per second through the orchestrator, by concurrency.

``ppio-sandbox-cli serve`` with the in-process hello template
(``benchmarks/templates/hello``), driven on the AgentCore-style route
``POST /v1/agents/bench-hello/invocations`` with one ``X-PPIO-Session-Id``
per connection (the first request creates the session, later ones reuse
it), against the bare raw-ASGI hello world on the same hypercorn and event
loop (uvloop on asyncio, and trio), at 1, 4, 16, 64 and 256 concurrent
connections, i.e. sessions (1 and 64 with ``--quick``; ``--concurrency``
picks others). Both servers run for a whole repetition; at each level the
hello world is measured, then the orchestrator. Targets (issue 10):
orchestrator req/s >= 0.9 x the hello world's at the same concurrency, p99
<= 1.5 x. Plots: req/s and p50/p99 against concurrency.

On asyncio also ``serve --server uvicorn`` (``orchestrator-uvicorn``:
httptools, uvloop) next to the same hello world on uvicorn
(``baseline-uvicorn``), all four servers up for the repetition and driven in
turn at each level. Targets (issue 10): ``orchestrator-uvicorn`` req/s >= 0.9
x ``baseline-uvicorn`` (its row's ratio) and >= 3 x the hypercorn
``orchestrator`` at the same level (a figure in the measures table).
"""

from __future__ import annotations

from typing import Any

from .. import procs
from ..core import (
    Bound,
    Measure,
    Progress,
    Row,
    RunConfig,
    ScenarioResult,
    Targets,
    concurrency_series,
    summarize,
)
from ..servers import BASELINE, BASELINE_UVICORN, ORCHESTRATOR, ORCHESTRATOR_UVICORN
from . import register
from ._loadtest import Subject, SweepScenario, loadgen_note, noise_note, run_sweep
from .runtime_rps import uvicorn_note

__all__ = ["OrchestratorRps"]

BODY = b'{"query":"hello"}'
TEMPLATE = "bench-hello"
PATH = f"/v1/agents/{TEMPLATE}/invocations"
TARGETS = Targets(min_rps_ratio=0.9, max_p99_ratio=1.5)
"""Issue 10: the orchestrator against the bare hello world on the same server."""
UVICORN_TARGETS = Targets(min_rps_ratio=0.9, max_p99_ratio=1.5)
"""``orchestrator-uvicorn`` over ``baseline-uvicorn`` (the hello world on the same server)."""
UVICORN_OVER_HYPERCORN = Bound(">=", 3.0, on="ratio")
"""``orchestrator-uvicorn`` req/s over the hypercorn ``orchestrator``'s, same level."""
LEVELS = (1, 4, 16, 64, 256)
QUICK_LEVELS = (1, 64)


class OrchestratorRps(SweepScenario):
    """The ``orchestrator-rps`` scenario."""

    name = "orchestrator-rps"
    description = (
        "POST /v1/agents/<t>/invocations req/s, p50, p99 at 1..256 sessions (in-process "
        "template, session per connection) vs raw-ASGI hypercorn hello world"
    )
    subjects = (
        Subject("baseline", BASELINE, PATH),
        Subject("orchestrator", ORCHESTRATOR, PATH),
    )
    uvicorn_subjects = (
        Subject(BASELINE_UVICORN.name, BASELINE_UVICORN, PATH),
        Subject(ORCHESTRATOR_UVICORN.name, ORCHESTRATOR_UVICORN, PATH),
    )
    """On asyncio only (uvicorn has no trio)."""
    levels = LEVELS
    quick_levels = QUICK_LEVELS
    body = BODY

    def _subjects(self, backend: str) -> tuple[Subject, ...]:
        if backend == "asyncio":
            return self.subjects + self.uvicorn_subjects
        return self.subjects

    def steps(self, config: RunConfig) -> int:
        """One step per (backend, repetition, level, subject); uvicorn on asyncio only."""
        levels = config.sweep(self.levels, self.quick_levels)
        subjects = sum(len(self._subjects(b)) for b in config.backends)
        return subjects * config.repetitions * len(levels)

    def run(self, config: RunConfig, progress: Progress) -> ScenarioResult:
        """Sweep the levels on every backend, ``config.repetitions`` times."""
        levels = config.sweep(self.levels, self.quick_levels)
        samples: list[dict[str, Any]] = []
        pinning = procs.plan_pinning(config.pin)
        for backend in config.backends:
            found, pinning = run_sweep(
                self.name,
                self._subjects(backend),
                config,
                progress,
                backends=[backend],
                body=BODY,
                levels=levels,
            )
            samples += found
        rows = summarize(self.name, samples, baseline="baseline", targets=TARGETS)
        _uvicorn_ratios(rows)
        measures = _uvicorn_measures(rows, config.repetitions)
        notes = [
            f"pinning: {pinning.to_json()}",
            loadgen_note(samples),
            f"orchestrator: one session per connection (up to {max(levels)} sessions), "
            "created by each connection's first request during the warm-up and kept "
            "for the higher levels; both servers up for the whole repetition, the one "
            "not measured idle on the same CPU",
        ]
        if "asyncio" in config.backends:
            notes.append(
                uvicorn_note().split(";")[0] + "; orchestrator-uvicorn (`serve --server "
                "uvicorn`) is judged >= 0.9x baseline-uvicorn (its row's ratio) and >= 3x the "
                "hypercorn orchestrator at the same level (figures table)"
            )
        noise = noise_note(samples)
        if noise:
            notes.append(noise)
        return ScenarioResult(
            name=self.name,
            rows=rows,
            samples=samples,
            notes=notes,
            measures=measures,
            settings={
                "body": BODY.decode(),
                "path": PATH,
                "levels": list(levels),
                "template": str(ORCHESTRATOR.argv[ORCHESTRATOR.argv.index("--template") + 1]),
                "targets": {
                    "min_rps_ratio": TARGETS.min_rps_ratio,
                    "uvicorn_min_rps_ratio": UVICORN_TARGETS.min_rps_ratio,
                    "uvicorn_over_hypercorn": UVICORN_OVER_HYPERCORN.limit,
                },
                "pinning": pinning.to_json(),
            },
            series=concurrency_series(rows),
        )


def _uvicorn_ratios(rows: list[Row]) -> None:
    """The uvicorn rows against ``baseline-uvicorn`` at the same level: the orchestrator's
    judged (>= 0.9x), the hello world's own ratio (to hypercorn's) left unjudged."""
    bases = {(r.backend, r.concurrency): r for r in rows if r.subject == BASELINE_UVICORN.name}
    for row in rows:
        if row.subject == BASELINE_UVICORN.name:
            row.targets = None
        if row.subject != ORCHESTRATOR_UVICORN.name:
            continue
        base = bases.get((row.backend, row.concurrency))
        if base is None:
            continue
        row.targets = UVICORN_TARGETS
        row.rps_ratio = row.rps.median / base.rps.median if base.rps.median else None
        row.p99_ratio = row.p99.median / base.p99.median if base.p99.median else None


def _uvicorn_measures(rows: list[Row], repetitions: int) -> list[Measure]:
    """``orchestrator-uvicorn`` req/s over the hypercorn orchestrator's, level by level."""
    hypercorn = {(r.backend, r.concurrency): r for r in rows if r.subject == ORCHESTRATOR.name}
    out: list[Measure] = []
    for row in rows:
        base = hypercorn.get((row.backend, row.concurrency))
        if row.subject != ORCHESTRATOR_UVICORN.name or base is None:
            continue
        out.append(
            Measure(
                scenario=OrchestratorRps.name,
                backend=row.backend,
                subject=row.subject,
                metric=f"req/s at c={row.concurrency}",
                unit="req/s",
                value=row.rps,
                repetitions=repetitions,
                baseline=ORCHESTRATOR.name,
                ratio=row.rps.median / base.rps.median if base.rps.median else None,
                target=UVICORN_OVER_HYPERCORN,
            )
        )
    return out


register(OrchestratorRps())
