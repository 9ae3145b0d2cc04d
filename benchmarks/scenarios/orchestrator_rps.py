"""``orchestrator-rps``: invocations per second through the orchestrator.

``ppio-sandbox-cli serve`` with the in-process hello template
(``benchmarks/templates/hello``), driven on the AgentCore-style route
``POST /v1/agents/bench-hello/invocations`` with one ``X-PPIO-Session-Id``
per connection (the first request creates the session, later ones reuse
it), against the bare raw-ASGI hello world on the same hypercorn and event
loop (uvloop on asyncio, and trio). Target: orchestrator req/s >= 0.7 x
the hello world's; p99 is reported as a ratio, not judged.
"""

from __future__ import annotations

from ..core import Progress, RunConfig, ScenarioResult, Targets, summarize
from ..servers import BASELINE, ORCHESTRATOR
from . import register
from ._loadtest import Subject, loadgen_note, noise_note, run_pairs

__all__ = ["OrchestratorRps"]

BODY = b'{"query":"hello"}'
TEMPLATE = "bench-hello"
PATH = f"/v1/agents/{TEMPLATE}/invocations"
TARGETS = Targets(min_rps_ratio=0.7, max_p99_ratio=None)


class OrchestratorRps:
    """The ``orchestrator-rps`` scenario."""

    name = "orchestrator-rps"
    description = (
        "POST /v1/agents/<t>/invocations req/s, p50, p99 (in-process template, session per "
        "connection) vs raw-ASGI hypercorn hello world"
    )
    subjects = (
        Subject("baseline", BASELINE, PATH),
        Subject("orchestrator", ORCHESTRATOR, PATH),
    )

    def steps(self, config: RunConfig) -> int:
        """One step per (backend, repetition, subject)."""
        return len(config.backends) * config.repetitions * len(self.subjects)

    def run(self, config: RunConfig, progress: Progress) -> ScenarioResult:
        """Measure every (backend, subject) pair ``config.repetitions`` times."""
        samples, pinning = run_pairs(
            self.name, self.subjects, config, progress, backends=config.backends, body=BODY
        )
        rows = summarize(self.name, samples, baseline="baseline", targets=TARGETS)
        notes = [
            f"pinning: {pinning.to_json()}",
            loadgen_note(samples),
            f"orchestrator: one session per connection ({config.connections} sessions), "
            "created by each connection's first request during the warm-up",
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
                "template": str(ORCHESTRATOR.argv[ORCHESTRATOR.argv.index("--template") + 1]),
                "targets": {"min_rps_ratio": TARGETS.min_rps_ratio},
                "pinning": pinning.to_json(),
            },
        )


register(OrchestratorRps())
