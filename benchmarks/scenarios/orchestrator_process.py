"""``orchestrator-process``: invocations per second through process sandboxes.

The orchestrator serving the process hello template
(``benchmarks/templates/hello_process``: one agent process per session)
on ``POST /v1/agents/bench-hello-process/invocations`` with one session per
connection, against the load generator calling the same agent directly:
one ``python -m ppio_sandbox.agent_runtime agent.py --bind unix:...``
process, started as a sandbox starts it, on its Unix socket. Before
measuring, one request per connection's session id starts its sandbox.
The orchestrator and its sandboxes share the server CPU (sandboxes inherit
its affinity); CPU % counts the orchestrator with its sandboxes.
Reported as a ratio, not judged.

Fewer connections than the other scenarios (at most 8): each is a session,
and each session is a process.
"""

from __future__ import annotations

from ..core import Progress, RunConfig, ScenarioResult, summarize
from ..servers import AGENT_PROCESS, ORCHESTRATOR_PROCESS
from . import register
from ._loadtest import Subject, loadgen_note, noise_note, run_pairs

__all__ = ["OrchestratorProcess"]

BODY = b'{"query":"hello"}'
TEMPLATE = "bench-hello-process"
MAX_CONNECTIONS = 8


class OrchestratorProcess:
    """The ``orchestrator-process`` scenario."""

    name = "orchestrator-process"
    description = (
        "invocations/s through the orchestrator to process sandboxes vs the same agent "
        "called directly on its Unix socket"
    )
    subjects = (
        Subject("agent-direct", AGENT_PROCESS, "/invocations"),
        Subject(
            "orchestrator",
            ORCHESTRATOR_PROCESS,
            f"/v1/agents/{TEMPLATE}/invocations",
            prime=True,
        ),
    )

    def steps(self, config: RunConfig) -> int:
        """One step per (backend, repetition, subject)."""
        return len(config.backends) * config.repetitions * len(self.subjects)

    def run(self, config: RunConfig, progress: Progress) -> ScenarioResult:
        """Measure every (backend, subject) pair ``config.repetitions`` times."""
        connections = min(config.connections, MAX_CONNECTIONS)
        samples, pinning = run_pairs(
            self.name,
            self.subjects,
            config,
            progress,
            backends=config.backends,
            body=BODY,
            connections=connections,
        )
        rows = summarize(self.name, samples, baseline="agent-direct", targets=None)
        notes = [
            f"{connections} connections = {connections} sessions = {connections} agent "
            "processes behind the orchestrator, 1 agent process when direct; the backend "
            "is the orchestrator's worker (agents run the runtime's default loop)",
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
                "connections": connections,
                "template": TEMPLATE,
                "pinning": pinning.to_json(),
            },
        )


register(OrchestratorProcess())
