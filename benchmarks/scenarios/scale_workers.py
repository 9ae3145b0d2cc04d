"""``scale-workers``: ``serve --workers 2`` against ``--workers 1`` on the same machine.

Two workloads, each subject next to the baseline in the same run:

* agent hosting (the ``agent-hosting`` methodology, :mod:`.agent_hosting`):
  N concurrent multi-turn streaming sessions on ``bench-think`` (50-500 ms
  think, 20 SSE chunks), driven by :mod:`benchmarks.agentgen` over TCP, at
  N = 1,000 and 10,000 (100 with ``--quick``; ``BENCH_SCALE_SESSIONS``
  overrides); a fresh server per (N, repetition, subject), N >= 10,000
  measured once, after 10 s of warm-up for 10 s (a turn there takes
  seconds: a shorter window would see the ramp's transient). Three
  subjects: ``workers-1`` (the baseline) and ``workers-2``, sessions named
  by the caller (``X-PPIO-Session-Id`` on the
  AgentCore route, as ``agent-hosting`` does), and ``workers-2
  server-named``: each session created by ``POST /v1/sessions`` on its
  connection, then its turns on ``/v1/sessions/<id>/invocations`` (agentgen
  ``--server-named``), so the worker that accepted the connection owns the
  session and nothing is forwarded: what two workers give without the hop.
  turns/s, overhead (latency - think) p50/p99, server and load-generator
  CPU, server RSS (the supervisor with its workers), and the share of
  turns forwarded between workers (``ppio_forwarded_total`` over
  ``ppio_turns_total``, from ``/metrics``). Targets, on both 2-worker
  subjects: turns/s >= 1.6 x ``workers-1`` (two cores, of which the load
  generator needs part of one), and overhead p99 under 1 s at N = 10,000.
* orchestrator-rps: ``POST /v1/agents/bench-hello/invocations``, one
  session per connection, closed loop, at 64 and 256 connections (64 with
  ``--quick``), the same three subjects (``server-named``: loadgen
  ``--server-named``, each connection creates its session and posts to its
  own route), one 1-worker and one 2-worker server up for a whole
  repetition and driven in turn. req/s and p99 ratios reported, not judged.

Pinning -- what makes the comparison fair. On a 2-core machine a 2-worker
server cannot be pinned to one CPU, so in this scenario *nothing* is
pinned, for either subject: the server (supervisor and workers) and the
load generator all float over both cores and the kernel schedules them, so
the worker count is the only difference between the two subjects. The
single worker can use at most one core whatever the pinning; the two
workers can use both, minus what the load generator takes (its CPU is in
the figures). ``--no-pin`` changes nothing here.

The load generator connects over TCP: the kernel spreads connections over
the workers (``SO_REUSEPORT``), and a caller-named session lives on the
worker its name hashes to, so on ``workers-2`` about half of the sessions
reach their owner through the other worker and every turn of theirs takes
the forwarding hop (the forwarded share of *turns* is lower when forwarded
turns are slower: each session is a closed loop). That is what a client
that does not follow ``X-PPIO-Owner`` gets.
"""

from __future__ import annotations

import contextlib
from typing import Any

from .. import agentgen, loadgen
from ..core import (
    Bound,
    Metric,
    Progress,
    RunConfig,
    ScenarioResult,
    Series,
    Spread,
    concurrency_series,
    summarize,
    summarize_measures,
)
from ..loadgen import raise_fd_limit
from ..servers import HELLO_TEMPLATE
from . import register
from ._loadtest import describe, loadgen_note, noise_note
from ._scale import (
    THINK_TEMPLATE,
    backend_for,
    metric_delta,
    orchestrator_spec,
    run_agentgen,
    run_loadgen,
    scrape_metrics,
    serve_node,
)
from .agent_hosting import (
    CHUNKS,
    MIN_DURATION,
    MIN_WARMUP,
    ONCE_FROM,
    SEED,
    TEMPLATE_ID,
    THINK_MS,
    _metrics,
    _ramp_timeout,
    session_counts,
)
from .agent_hosting import describe as describe_agents

__all__ = ["ScaleWorkers"]

WORKERS = (1, 2)
AGENT_SUBJECTS = ((1, False), (2, False), (2, True))
"""(workers, server-named sessions): the subjects of both parts."""
BASELINE = "workers-1"
ENV_SESSIONS = "BENCH_SCALE_SESSIONS"
TURNS_TARGET = 1.6
OVERHEAD_P99_TARGET_MS = 1000.0
OVERHEAD_TARGET_FROM = 10_000
LONG_WARMUP = 10.0
LONG_DURATION = 10.0
"""Window for N >= 10,000: a turn there takes seconds (N / turns/s), so 2 s of
warm-up and 5 s measured would see the ramp's transient, not the steady state."""
RPS_LEVELS = (64, 256)
RPS_QUICK_LEVELS = (64,)
RPS_PATH = "/v1/agents/bench-hello/invocations"
BODY = b'{"query":"hello"}'


def sessions_for(config: RunConfig) -> tuple[int, ...]:
    """The N to measure: ``$BENCH_SCALE_SESSIONS`` or the quick or full defaults."""
    return session_counts(ENV_SESSIONS, (100,) if config.quick else (1_000, 10_000))


def _repetitions(config: RunConfig, sessions: int) -> int:
    return 1 if sessions >= ONCE_FROM else config.repetitions


def _label(workers: int, sessions: int | None = None, server_named: bool = False) -> str:
    base = f"workers-{workers}" + (" server-named" if server_named else "")
    return base if sessions is None else f"{base} N={sessions:,}"


def _agent_metrics(sessions: int) -> list[Metric]:
    subject = (_label(2, sessions), _label(2, sessions, True))
    overhead_target = (
        Bound("<=", OVERHEAD_P99_TARGET_MS) if sessions >= OVERHEAD_TARGET_FROM else None
    )
    return [
        Metric(
            "turns",
            "turns/s",
            "/s",
            target=Bound(">=", TURNS_TARGET, on="ratio"),
            target_subjects=subject,
        ),
        Metric("ratio", "turns/s / ideal", "x", digits=3),
        Metric("overhead_p50", "overhead p50 (latency - think)", "ms", digits=1),
        Metric(
            "overhead_p99",
            "overhead p99 (latency - think)",
            "ms",
            digits=1,
            target=overhead_target,
            target_subjects=subject,
        ),
        Metric("ttfc_p99", "first chunk p99 (- think)", "ms", digits=1),
        Metric("server_cpu", "server CPU (all workers)", "%"),
        Metric("loadgen_cpu", "load generator CPU", "%"),
        Metric("turns_per_cpu", "turns per server CPU-second", "/s"),
        Metric("rss", "server RSS (all workers)", "MiB", digits=1),
        Metric("forwarded", "turns forwarded between workers", "%", digits=1),
    ]


RPS_METRICS = [
    Metric("forwarded", "requests forwarded between workers", "%", digits=1),
    Metric("cpu_per_request", "server CPU per request", "µs"),
]


def _forwarded_percent(before: dict[str, float], after: dict[str, float]) -> float | None:
    turns = metric_delta(before, after, "ppio_turns_total")
    if turns <= 0:
        return None
    return 100.0 * metric_delta(before, after, "ppio_forwarded_total", 'outcome="ok"') / turns


def _spec(workers: int, template: Any) -> Any:
    return orchestrator_spec(_label(workers), (template,), ("--workers", str(workers)))


class ScaleWorkers:
    """The ``scale-workers`` scenario."""

    name = "scale-workers"
    description = (
        "serve --workers 2 vs --workers 1 (nothing pinned): agent hosting at N = 1,000 and "
        "10,000 sessions (turns/s, overhead p99) and orchestrator-rps (req/s, p99)"
    )

    def steps(self, config: RunConfig) -> int:
        """One step per (N, repetition, subject), then per (repetition, level, subject)."""
        agents = sum(_repetitions(config, n) for n in sessions_for(config)) * len(AGENT_SUBJECTS)
        levels = config.sweep(RPS_LEVELS, RPS_QUICK_LEVELS)
        return agents + config.repetitions * len(levels) * len(AGENT_SUBJECTS)

    def run(self, config: RunConfig, progress: Progress) -> ScenarioResult:
        """Agent hosting first (a fresh server per sample), then the rps sweep."""
        backend = backend_for(config)
        fd_limit = raise_fd_limit()
        notes = [
            f"{backend} only; nothing pinned (server workers and load generator float over "
            f"every CPU, for both subjects); open-file limit {fd_limit}"
        ]
        agents, failures = self._agents(config, progress, backend, fd_limit, notes)
        rps = self._rps(config, progress, backend)
        measures = []
        for sessions in sessions_for(config):
            group = [s for s in agents if s["sessions"] == sessions]
            measures += summarize_measures(
                self.name, group, _agent_metrics(sessions), baseline=_label(1, sessions)
            )
        rows = summarize(self.name, rps, baseline=BASELINE, targets=None)
        per_level = [{**s, "subject": f"{s['subject']} c={s['concurrency']}"} for s in rps]
        measures += summarize_measures(self.name, per_level, RPS_METRICS, baseline=None)
        for row in rows:
            if row.errors or not row.rps.min:
                failures.append(f"{self.name} {row.subject} c={row.concurrency}: errors")
        notes.append(f"orchestrator-rps part: {loadgen_note(rps)}; ratios reported, not judged")
        for sessions in sessions_for(config):
            base = [s for s in agents if s["subject"] == _label(1, sessions)]
            for named in (False, True):
                scaled = [s for s in agents if s["subject"] == _label(2, sessions, named)]
                if base and scaled:
                    ratio = Spread.of(s["metrics"]["turns"] for s in scaled).median / max(
                        Spread.of(s["metrics"]["turns"] for s in base).median, 1e-9
                    )
                    notes.append(
                        f"N={sessions:,}: {_label(2, None, named)} / workers-1 turns/s = "
                        f"{ratio:.2f} (target >= {TURNS_TARGET})"
                    )
        noise = noise_note(agents + rps)
        if noise:
            notes.append(noise)
        return ScenarioResult(
            name=self.name,
            rows=rows,
            samples=agents + rps,
            notes=notes,
            settings={
                "backend": backend,
                "workers": list(WORKERS),
                "sessions": list(sessions_for(config)),
                "rps_levels": list(config.sweep(RPS_LEVELS, RPS_QUICK_LEVELS)),
                "pinning": "none (server and load generator unpinned, both subjects)",
                "targets": {
                    "turns_ratio_min": TURNS_TARGET,
                    "overhead_p99_ms_max_at_10000": OVERHEAD_P99_TARGET_MS,
                },
            },
            measures=measures,
            failures=failures,
            series=_series(agents) + concurrency_series(rows),
        )

    def _agents(
        self,
        config: RunConfig,
        progress: Progress,
        backend: str,
        fd_limit: int,
        notes: list[str],
    ) -> tuple[list[dict[str, Any]], list[str]]:
        # --quick: the run's own short window (a smoke test); else at least the
        # agent-hosting minimums (think times reach 0.5 s).
        warmup = config.warmup if config.quick else max(config.warmup, MIN_WARMUP)
        duration = config.duration if config.quick else max(config.duration, MIN_DURATION)
        samples: list[dict[str, Any]] = []
        failures: list[str] = []
        for sessions in sessions_for(config):
            if sessions + 64 > fd_limit:
                notes.append(f"N={sessions:,}: skipped, needs {sessions + 64} file descriptors")
                continue
            for rep in range(1, _repetitions(config, sessions) + 1):
                for workers, named in AGENT_SUBJECTS:
                    subject = _label(workers, sessions, named)
                    label = f"{self.name} {backend} {subject} rep {rep}"
                    progress.start(label)
                    with serve_node(_spec(workers, THINK_TEMPLATE), backend, config, None) as node:
                        before = scrape_metrics(node.port)
                        opts = agentgen.AgentOptions(
                            port=node.port,
                            template=TEMPLATE_ID,
                            sessions=sessions,
                            chunks=CHUNKS,
                            think_min=THINK_MS[0],
                            think_max=THINK_MS[1],
                            seed=SEED,
                            warmup=max(warmup, LONG_WARMUP) if sessions >= ONCE_FROM else warmup,
                            duration=(
                                max(duration, LONG_DURATION) if sessions >= ONCE_FROM else duration
                            ),
                            server_pid=node.pid,
                            ramp_timeout=_ramp_timeout(sessions),
                            server_named=named,
                        )
                        result = run_agentgen(opts, None)
                        after = scrape_metrics(node.port)
                    metrics = _metrics(result)
                    cpu = result["server_cpu_percent"]
                    if cpu:
                        metrics["turns_per_cpu"] = result["turns_per_second"] / (cpu / 100.0)
                    forwarded = _forwarded_percent(before, after)
                    if forwarded is not None:
                        metrics["forwarded"] = forwarded
                    text = describe_agents(result)
                    if forwarded is not None:
                        text += f", {forwarded:.0f} % forwarded"
                    progress.finish(text)
                    if result["errors"] or not result["turns"]:
                        failures.append(
                            f"{label}: {result['turns']} turns, {result['errors']} errors "
                            f"{result['error_kinds']}"
                        )
                    samples.append(
                        {
                            "backend": backend,
                            "subject": subject,
                            "workers": workers,
                            "server_named": named,
                            "sessions": sessions,
                            "repetition": rep,
                            "part": "agent-hosting",
                            "loadgen_command": agentgen.command(opts),
                            "startup_seconds": round(node.server.startup_seconds, 3),
                            "metrics": metrics,
                            "result": result,
                        }
                    )
        return samples, failures

    def _rps(self, config: RunConfig, progress: Progress, backend: str) -> list[dict[str, Any]]:
        levels = config.sweep(RPS_LEVELS, RPS_QUICK_LEVELS)
        samples: list[dict[str, Any]] = []
        for rep in range(1, config.repetitions + 1):
            with contextlib.ExitStack() as stack:
                nodes = {
                    workers: stack.enter_context(
                        serve_node(_spec(workers, HELLO_TEMPLATE), backend, config, None)
                    )
                    for workers in WORKERS
                }
                for level in levels:
                    for workers, named in AGENT_SUBJECTS:
                        node = nodes[workers]
                        subject = _label(workers, None, named)
                        progress.start(f"{self.name} {backend} {subject} rps c={level} rep {rep}")
                        before = scrape_metrics(node.port)
                        opts = loadgen.Options(
                            port=node.port,
                            path=RPS_PATH,
                            body=BODY,
                            connections=level,
                            warmup=config.warmup,
                            duration=config.duration,
                            server_pid=node.pid,
                            server_named="bench-hello" if named else None,
                            session_prefix=f"rps-r{rep}-",
                        )
                        result = run_loadgen(opts, None)
                        after = scrape_metrics(node.port)
                        metrics: dict[str, float] = {}
                        forwarded = _forwarded_percent(before, after)
                        if forwarded is not None:
                            metrics["forwarded"] = forwarded
                        if result["server_cpu_percent"] and result["rps"]:
                            metrics["cpu_per_request"] = (
                                result["server_cpu_percent"] / 100.0 / result["rps"] * 1e6
                            )
                        text = describe(result)
                        if forwarded is not None:
                            text += f", {forwarded:.0f} % forwarded"
                        progress.finish(text)
                        samples.append(
                            {
                                "backend": backend,
                                "subject": subject,
                                "workers": workers,
                                "server_named": named,
                                "repetition": rep,
                                "part": "orchestrator-rps",
                                "concurrency": level,
                                "loadgen_command": loadgen.command(opts),
                                "metrics": metrics,
                                "result": result,
                            }
                        )
        return samples


def _series(samples: list[dict[str, Any]]) -> list[Series]:
    """Agent hosting: turns/s and overhead p99 against N, a line per worker count."""
    throughput = Series(
        "agents-throughput", "agent hosting: turns/s vs sessions", "sessions", "turns/s", x_log=True
    )
    overhead = Series(
        "agents-overhead",
        "agent hosting: overhead p99 (solid) and p50 (dashed) vs sessions",
        "sessions",
        "ms",
        x_log=True,
        y_log=True,
    )
    groups: dict[tuple[int, bool, int], list[dict[str, float]]] = {}
    for sample in samples:
        key = (sample["workers"], sample["server_named"], sample["sessions"])
        groups.setdefault(key, []).append(sample["metrics"])
    for (workers, named, sessions), group in sorted(groups.items()):
        label = _label(workers, None, named)
        for series, key, name, dashed in (
            (throughput, "turns", label, False),
            (overhead, "overhead_p99", f"{label} p99", False),
            (overhead, "overhead_p50", f"{label} p50", True),
        ):
            values = [m[key] for m in group if key in m]
            if values:
                spread = Spread.of(values)
                series.line(name, dashed=dashed, group=label).add(
                    sessions, spread.median, spread.min, spread.max
                )
    return [s for s in (throughput, overhead) if not s.empty]


register(ScaleWorkers())
