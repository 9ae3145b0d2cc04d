"""``orchestrator-process``: invocations per second through process sandboxes, by concurrency.

The orchestrator serving the process hello template
(``benchmarks/templates/hello_process``: one agent process per session)
on ``POST /v1/agents/bench-hello-process/invocations`` with one session per
connection, against the load generator calling the same agent directly:
one ``python -m ppio_sandbox.agent_runtime agent.py --bind unix:...``
process on its Unix socket (``agent-direct``: the runtime's default server,
hypercorn, the baseline; ``agent-direct-uvicorn``: on uvicorn, which is
what the sandboxes run when uvicorn is installed, ``serve
--sandbox-server auto``). ``orchestrator-sandbox-hypercorn`` is the
orchestrator with its sandboxes on hypercorn (``--sandbox-server
hypercorn``). Before measuring, one request per connection's session id
starts its sandbox.
The orchestrator and its sandboxes share the server CPU (sandboxes inherit
its affinity); CPU % counts the orchestrator with its sandboxes.
Reported as a ratio, not judged; plots of req/s and p50/p99 against
concurrency.

Each connection is a session, and each session is a process: the sweep
stops at 64 concurrent connections (1, 4, 16 and 64; 1 and 4 with
``--quick``), where 64 agent processes share one CPU (starting them one by
one takes ~15 s) and the direct agent is long saturated. All servers run
for a whole repetition; sessions started at one level are kept for the next.
"""

from __future__ import annotations

from ..core import Progress, RunConfig, ScenarioResult, concurrency_series, summarize
from ..servers import (
    AGENT_PROCESS,
    AGENT_PROCESS_UVICORN,
    ORCHESTRATOR_PROCESS,
    ORCHESTRATOR_PROCESS_HYPERCORN,
)
from . import register
from ._loadtest import Subject, SweepScenario, loadgen_note, noise_note

__all__ = ["OrchestratorProcess"]

BODY = b'{"query":"hello"}'
TEMPLATE = "bench-hello-process"
LEVELS = (1, 4, 16, 64)
QUICK_LEVELS = (1, 4)


class OrchestratorProcess(SweepScenario):
    """The ``orchestrator-process`` scenario."""

    name = "orchestrator-process"
    description = (
        "invocations/s at 1..64 sessions through the orchestrator to process sandboxes vs "
        "the same agent called directly on its Unix socket"
    )
    subjects = (
        Subject("agent-direct", AGENT_PROCESS, "/invocations"),
        Subject("agent-direct-uvicorn", AGENT_PROCESS_UVICORN, "/invocations"),
        Subject(
            "orchestrator",
            ORCHESTRATOR_PROCESS,
            f"/v1/agents/{TEMPLATE}/invocations",
            prime=True,
        ),
        Subject(
            "orchestrator-sandbox-hypercorn",
            ORCHESTRATOR_PROCESS_HYPERCORN,
            f"/v1/agents/{TEMPLATE}/invocations",
            prime=True,
        ),
    )
    levels = LEVELS
    quick_levels = QUICK_LEVELS
    body = BODY

    def run(self, config: RunConfig, progress: Progress) -> ScenarioResult:
        """Sweep the levels on every backend, ``config.repetitions`` times."""
        levels, samples, pinning = self.sweep(config, progress)
        rows = summarize(self.name, samples, baseline="agent-direct", targets=None)
        notes = [
            "N connections = N sessions = N agent processes behind the orchestrator "
            f"(N = {', '.join(map(str, levels))}), 1 agent process when direct; the backend "
            "is the orchestrator's worker; the orchestrator's step includes starting the "
            "new level's sandboxes (priming)",
            "the agent's server: agent-direct runs the runtime's default (hypercorn, as "
            "app.run() does), agent-direct-uvicorn uvicorn; the orchestrator's sandboxes run "
            "uvicorn (serve --sandbox-server auto, uvicorn installed), "
            "orchestrator-sandbox-hypercorn's run hypercorn (--sandbox-server hypercorn); "
            "every ratio is to agent-direct",
            f"pinning: {pinning.to_json()}",
            loadgen_note(samples),
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
                "levels": list(levels),
                "template": TEMPLATE,
                "pinning": pinning.to_json(),
            },
            series=concurrency_series(rows),
        )


register(OrchestratorProcess())
