"""``scale-forwarding``: what the hop to a session's owner costs.

One ``serve --workers 2`` (templates ``bench-hello`` and ``bench-think``),
every session named by the caller with an id worker ``w1`` owns (picked by
asking the orchestrator's own placement, :class:`WorkerSet`). The load
generator connects straight to a worker's Unix socket
(``<data dir>/run/w<i>.sock``), so where each request goes is decided, not
left to ``SO_REUSEPORT``:

* ``direct`` (the baseline): to ``w1.sock``, the owner; nothing is forwarded;
* ``forwarded``: to ``w0.sock``; ``w0`` forwards every request to ``w1``
  over ``w1``'s socket and relays the reply (the ``ppio_forwarded_total``
  delta is checked to equal the requests).

Two workloads on the same server, each subject right after the baseline:

* ``POST /v1/agents/bench-hello/invocations`` in a closed loop
  (:mod:`benchmarks.loadgen`) at 1 and 64 connections (16 with
  ``--quick``), one session per connection: req/s, p50/p99, server CPU per
  request (the hop's CPU is the difference);
* streaming turns (:mod:`benchmarks.agentgen`, ``bench-think``: 50-500 ms
  think, 20 SSE chunks relayed chunk by chunk) with N = 100 sessions (20
  with ``--quick``): turns/s, overhead (latency - think) p50/p99, server
  CPU per turn.

Pinning: the whole server (supervisor and both workers) on the server CPU,
the load generator on the other, as in the single-server scenarios: the
ratio of req/s is then the ratio of CPU per request, and a forwarded
request pays for both workers on one core. On a machine with a core per
worker the hop's CPU is spread and its latency lower; its CPU cost is the
same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import agentgen, loadgen, procs
from ..core import (
    Metric,
    Progress,
    RunConfig,
    ScenarioResult,
    concurrency_series,
    summarize,
    summarize_measures,
)
from ..servers import HELLO_TEMPLATE
from . import register
from ._loadtest import describe, loadgen_note, noise_note
from ._scale import (
    THINK_TEMPLATE,
    backend_for,
    claim_session_ids,
    metric_delta,
    orchestrator_spec,
    run_agentgen,
    run_loadgen,
    scrape_metrics,
    serve_node,
    session_ids,
    write_ids,
)
from .agent_hosting import CHUNKS, SEED, TEMPLATE_ID, THINK_MS, _metrics
from .agent_hosting import describe as describe_agents

__all__ = ["ScaleForwarding"]

OWNER = 1
ENTRY = {"direct": 1, "forwarded": 0}
"""Which worker's socket each subject connects to (sessions are owned by ``w1``)."""
BASELINE = "direct"
PATH = "/v1/agents/bench-hello/invocations"
BODY = b'{"query":"hello"}'
LEVELS = (1, 64)
QUICK_LEVELS = (16,)
AGENT_SESSIONS = 100
QUICK_AGENT_SESSIONS = 20
MIN_WARMUP = 1.0
MIN_DURATION = 2.0

HELLO_METRICS = [
    Metric("cpu_per_request", "server CPU per request", "µs"),
    Metric("forwarded", "requests forwarded", "%", digits=1),
]
AGENT_METRICS = [
    Metric("turns", "turns/s", "/s"),
    Metric("overhead_p50", "overhead p50 (latency - think)", "ms", digits=1),
    Metric("overhead_p99", "overhead p99 (latency - think)", "ms", digits=1),
    Metric("ttfc_p99", "first chunk p99 (- think)", "ms", digits=1),
    Metric("server_cpu", "server CPU", "%"),
    Metric("cpu_per_turn", "server CPU per turn", "µs"),
    Metric("forwarded", "turns forwarded", "%", digits=1),
]


def _forwarded(before: dict[str, float], after: dict[str, float], done: float) -> float | None:
    if done <= 0:
        return None
    return 100.0 * metric_delta(before, after, "ppio_forwarded_total", 'outcome="ok"') / done


def _agent_sessions(config: RunConfig) -> int:
    return QUICK_AGENT_SESSIONS if config.quick else AGENT_SESSIONS


class ScaleForwarding:
    """The ``scale-forwarding`` scenario."""

    name = "scale-forwarding"
    description = (
        "forwarding hop between workers: requests and streaming turns sent to a non-owner "
        "worker's socket (all forwarded) vs to the owner's, req/s, p50/p99, CPU per request"
    )

    def steps(self, config: RunConfig) -> int:
        """Per repetition: each (level, subject), then each streaming subject."""
        levels = config.sweep(LEVELS, QUICK_LEVELS)
        return config.repetitions * (len(levels) + 1) * len(ENTRY)

    def run(self, config: RunConfig, progress: Progress) -> ScenarioResult:
        """One 2-worker server per repetition; both workloads on it."""
        backend = backend_for(config)
        pinning = procs.plan_pinning(config.pin)
        levels = config.sweep(LEVELS, QUICK_LEVELS)
        sessions = _agent_sessions(config)
        hello_names = session_ids(max(levels), "fwd-")
        think_names = session_ids(sessions, "fwd-think-")
        hello_ids = write_ids(config.workdir, "forwarding-hello", hello_names)
        think_ids = write_ids(config.workdir, "forwarding-think", think_names)
        spec = orchestrator_spec("forwarding", (HELLO_TEMPLATE, THINK_TEMPLATE), ("--workers", "2"))
        hello: list[dict[str, Any]] = []
        agents: list[dict[str, Any]] = []
        failures: list[str] = []
        for rep in range(1, config.repetitions + 1):
            with serve_node(spec, backend, config, pinning.server) as node:
                # The sessions are w1's: created through its socket (the first use owns).
                claim_session_ids(node.socket(OWNER), "bench-hello", hello_names)
                claim_session_ids(node.socket(OWNER), TEMPLATE_ID, think_names)
                for level in levels:
                    for subject, worker in ENTRY.items():
                        progress.start(f"{self.name} {backend} {subject} c={level} rep {rep}")
                        sample = self._hello(
                            config, node.socket(worker), node.pid, hello_ids, level, pinning
                        )
                        sample.update(backend=backend, subject=subject, repetition=rep)
                        progress.finish(
                            describe(sample["result"])
                            + f", {sample['metrics'].get('forwarded', 0):.0f} % forwarded"
                        )
                        hello.append(sample)
                for subject, worker in ENTRY.items():
                    label = f"{self.name} {backend} {subject} N={sessions} streams"
                    progress.start(f"{label} rep {rep}")
                    sample = self._agents(
                        config, node.socket(worker), node.pid, think_ids, sessions, pinning
                    )
                    sample.update(backend=backend, subject=subject, repetition=rep)
                    result = sample["result"]
                    progress.finish(describe_agents(result))
                    if result["errors"] or not result["turns"]:
                        failures.append(
                            f"{self.name} {subject} streams: {result['turns']} turns, "
                            f"{result['errors']} errors {result['error_kinds']}"
                        )
                    agents.append(sample)
        rows = summarize(self.name, hello, baseline=BASELINE, targets=None)
        for row in rows:
            if row.errors or not row.rps.min:
                failures.append(f"{self.name} {row.subject} c={row.concurrency}: errors")
        per_level = [{**s, "subject": f"{s['subject']} c={s['concurrency']}"} for s in hello]
        measures = []
        for level in levels:
            group = [s for s in per_level if s["concurrency"] == level]
            measures += summarize_measures(
                self.name, group, HELLO_METRICS, baseline=f"{BASELINE} c={level}"
            )
        streams = [{**s, "subject": f"{s['subject']} N={sessions}"} for s in agents]
        measures += summarize_measures(
            self.name, streams, AGENT_METRICS, baseline=f"{BASELINE} N={sessions}"
        )
        notes = [
            f"{backend} only; pinning: {pinning.to_json()} (the server's supervisor and both "
            "workers share the server CPU)",
            f"sessions owned by w{OWNER}; direct = load generator on w{OWNER}.sock, forwarded = "
            "on w0.sock",
            loadgen_note(hello),
        ]
        noise = noise_note(hello + agents)
        if noise:
            notes.append(noise)
        return ScenarioResult(
            name=self.name,
            rows=rows,
            samples=hello + agents,
            notes=notes,
            settings={
                "backend": backend,
                "workers": 2,
                "owner": f"w{OWNER}",
                "entry": {k: f"w{v}.sock" for k, v in ENTRY.items()},
                "levels": list(levels),
                "stream_sessions": sessions,
                "pinning": pinning.to_json(),
            },
            measures=measures,
            failures=failures,
            series=concurrency_series(rows),
        )

    def _hello(
        self,
        config: RunConfig,
        socket: Path,
        server_pid: int,
        ids: Path,
        level: int,
        pinning: procs.Pinning,
    ) -> dict[str, Any]:
        before = scrape_metrics(socket)
        opts = loadgen.Options(
            port=0,
            unix=str(socket),
            path=PATH,
            body=BODY,
            connections=level,
            warmup=config.warmup,
            duration=config.duration,
            server_pid=server_pid,
            session_ids=str(ids),
        )
        result = run_loadgen(opts, pinning.loadgen)
        after = scrape_metrics(socket)
        done = metric_delta(before, after, "ppio_turns_total")
        metrics: dict[str, float] = {}
        forwarded = _forwarded(before, after, done)
        if forwarded is not None:
            metrics["forwarded"] = forwarded
        if result["server_cpu_percent"] and result["rps"]:
            metrics["cpu_per_request"] = result["server_cpu_percent"] / 100.0 / result["rps"] * 1e6
        return {
            "concurrency": level,
            "part": "requests",
            "loadgen_command": loadgen.command(opts),
            "metrics": metrics,
            "result": result,
        }

    def _agents(
        self,
        config: RunConfig,
        socket: Path,
        server_pid: int,
        ids: Path,
        sessions: int,
        pinning: procs.Pinning,
    ) -> dict[str, Any]:
        before = scrape_metrics(socket)
        opts = agentgen.AgentOptions(
            unix=str(socket),
            template=TEMPLATE_ID,
            sessions=sessions,
            chunks=CHUNKS,
            think_min=THINK_MS[0],
            think_max=THINK_MS[1],
            seed=SEED,
            warmup=max(config.warmup, MIN_WARMUP if not config.quick else 0.5),
            duration=max(config.duration, MIN_DURATION if not config.quick else 1.0),
            server_pid=server_pid,
            ramp_timeout=30.0,
            session_ids=str(ids),
        )
        result = run_agentgen(opts, pinning.loadgen)
        after = scrape_metrics(socket)
        metrics = _metrics(result)
        done = metric_delta(before, after, "ppio_turns_total")
        forwarded = _forwarded(before, after, done)
        if forwarded is not None:
            metrics["forwarded"] = forwarded
        cpu = result["server_cpu_percent"]
        if cpu and result["turns_per_second"]:
            metrics["cpu_per_turn"] = cpu / 100.0 / result["turns_per_second"] * 1e6
        return {
            "sessions": sessions,
            "part": "streams",
            "loadgen_command": agentgen.command(opts),
            "metrics": metrics,
            "result": result,
        }


register(ScaleForwarding())
