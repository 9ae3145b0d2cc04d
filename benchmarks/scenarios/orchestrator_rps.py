"""``orchestrator-rps``: invocations per second through the orchestrator, by concurrency.

``ppio-sandbox-cli serve`` with the in-process hello template
(``benchmarks/templates/hello``), driven on the AgentCore-style route
``POST /v1/agents/bench-hello/invocations`` with one ``X-PPIO-Session-Id``
per connection (the first request creates the session, later ones reuse
it), against the bare raw-ASGI hello world on the same hypercorn and event
loop (uvloop on asyncio, and trio), at 1, 4, 16, 64 and 256 concurrent
connections, i.e. sessions (1 and 64 with ``--quick``; ``--concurrency``
picks others). Both servers run for a whole repetition; at each level the
hello world is measured, then the orchestrator. Target: orchestrator req/s
>= 0.7 x the hello world's at the same concurrency; p99 is reported as a
ratio, not judged. Plots: req/s and p50/p99 against concurrency.
"""

from __future__ import annotations

from ..core import (
    Progress,
    RunConfig,
    ScenarioResult,
    Targets,
    concurrency_series,
    summarize,
)
from ..servers import BASELINE, ORCHESTRATOR
from . import register
from ._loadtest import Subject, SweepScenario, loadgen_note, noise_note

__all__ = ["OrchestratorRps"]

BODY = b'{"query":"hello"}'
TEMPLATE = "bench-hello"
PATH = f"/v1/agents/{TEMPLATE}/invocations"
TARGETS = Targets(min_rps_ratio=0.7, max_p99_ratio=None)
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
    levels = LEVELS
    quick_levels = QUICK_LEVELS
    body = BODY

    def run(self, config: RunConfig, progress: Progress) -> ScenarioResult:
        """Sweep the levels on every backend, ``config.repetitions`` times."""
        levels, samples, pinning = self.sweep(config, progress)
        rows = summarize(self.name, samples, baseline="baseline", targets=TARGETS)
        notes = [
            f"pinning: {pinning.to_json()}",
            loadgen_note(samples),
            f"orchestrator: one session per connection (up to {max(levels)} sessions), "
            "created by each connection's first request during the warm-up and kept "
            "for the higher levels; both servers up for the whole repetition, the one "
            "not measured idle on the same CPU",
        ]
        noise = noise_note(samples)
        if noise:
            notes.append(noise)
        return ScenarioResult(
            name=self.name,
            rows=rows,
            samples=samples,
            notes=notes,
            settings={
                "body": BODY.decode(),
                "path": PATH,
                "levels": list(levels),
                "template": str(ORCHESTRATOR.argv[ORCHESTRATOR.argv.index("--template") + 1]),
                "targets": {"min_rps_ratio": TARGETS.min_rps_ratio},
                "pinning": pinning.to_json(),
            },
            series=concurrency_series(rows),
        )


register(OrchestratorRps())
