"""``agent-hosting``: N concurrent multi-turn streaming sessions on the orchestrator.

``ppio-sandbox-cli serve`` with the in-process think template
(``benchmarks/templates/think``, ``bench-think``), pinned to the server CPU,
driven by :mod:`benchmarks.agentgen` pinned to the other: N sessions, one
keep-alive connection each, loop over turns on ``POST
/v1/agents/bench-think/invocations``. Each turn the agent awaits a simulated
model call of 50-500 ms (uniform, decided by a fixed seed, the session and
the turn number) and then streams 20 chunks as Server-Sent Events.

The baseline is the ideal: with no overhead each session completes one turn
per mean think time, so N / 0.275 s turns per second. Reported per backend
and N: achieved turns/s and its ratio to the ideal; turn latency minus the
turn's own think time (the orchestrator's overhead, HTTP and stream
included) at p50 and p99; time to the first chunk minus the think time; the
orchestrator's RSS in the measured window, and per session (RSS growth over
the idle server / N); server and load-generator CPU, which tell what limits
a run that falls short of the ideal.

N = 100, 1,000 and 10,000 (50 and 200 with ``--quick``;
``BENCH_AGENT_SESSIONS=1000,5000`` overrides); N = 10,000 is measured once
per backend. The measured window is at least 2 s after at least 1 s of
warm-up (think times reach 0.5 s), and opens once every session has finished
a turn.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from .. import ROOT, agentgen, procs
from ..core import (
    Metric,
    Progress,
    RunConfig,
    ScenarioResult,
    Series,
    Spread,
    summarize_measures,
)
from ..loadgen import SATURATED_CPU, raise_fd_limit
from ..servers import HELLO_TEMPLATE, ORCHESTRATOR, ServerSpec
from . import register
from ._loadtest import noise_and_errors, noise_note, serve_pinned

__all__ = ["AgentHosting"]

THINK_TEMPLATE = ROOT / "benchmarks" / "templates" / "think"
"""The in-process agent: ``think_ms`` of ``await sleep``, then ``chunks`` chunks."""
TEMPLATE_ID = "bench-think"
ORCHESTRATOR_THINK: ServerSpec = dataclasses.replace(
    ORCHESTRATOR,
    argv=tuple(str(THINK_TEMPLATE) if a == str(HELLO_TEMPLATE) else a for a in ORCHESTRATOR.argv),
)
CHUNKS = 20
THINK_MS = (50, 500)
SEED = 20261124
ONCE_FROM = 10_000
"""N from which a (backend, N) is measured once, not ``repetitions`` times."""
MIN_WARMUP = 1.0
MIN_DURATION = 2.0
ENV_SESSIONS = "BENCH_AGENT_SESSIONS"

METRICS = [
    Metric("turns", "turns/s", "/s"),
    Metric("ideal", "ideal turns/s (N / mean think)", "/s"),
    Metric("ratio", "turns/s / ideal", "x", digits=3),
    Metric("overhead_p50", "overhead p50 (latency - think)", "ms", digits=1),
    Metric("overhead_p99", "overhead p99 (latency - think)", "ms", digits=1),
    Metric("ttfc_p50", "first chunk p50 (- think)", "ms", digits=1),
    Metric("ttfc_p99", "first chunk p99 (- think)", "ms", digits=1),
    Metric("rss", "server RSS, steady", "MiB", digits=1),
    Metric("rss_session", "server RSS / session", "KiB", digits=1),
    Metric("server_cpu", "server CPU", "%"),
    Metric("loadgen_cpu", "load generator CPU", "%"),
]


def session_counts(variable: str, default: tuple[int, ...]) -> tuple[int, ...]:
    """The N to measure: ``$variable`` (comma-separated, each >= 1) or ``default``."""
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return default
    try:
        counts = tuple(int(part) for part in raw.split(","))
    except ValueError:
        raise ValueError(f"{variable}={raw!r}: expected comma-separated integers") from None
    if not counts or min(counts) < 1:
        raise ValueError(f"{variable}={raw!r}: every N must be >= 1")
    return counts


def sessions_for(config: RunConfig) -> tuple[int, ...]:
    """The N to measure: ``$BENCH_AGENT_SESSIONS`` or the quick or full defaults."""
    return session_counts(ENV_SESSIONS, (50, 200) if config.quick else (100, 1_000, 10_000))


def _repetitions(config: RunConfig, sessions: int) -> int:
    return 1 if sessions >= ONCE_FROM else config.repetitions


def _ramp_timeout(sessions: int) -> float:
    """Time for the server to begin answering every session (10 s + 5 ms per session):
    generous for a server that keeps up, a cap on the run for one that does not."""
    return 10.0 + sessions / 200.0


def _subject(sessions: int) -> str:
    return f"N={sessions:,}"


def _metrics(result: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {
        "turns": result["turns_per_second"],
        "ideal": result["ideal_turns_per_second"],
        "ratio": result["ideal_ratio"],
        "overhead_p50": result["overhead_ms"]["p50"],
        "overhead_p99": result["overhead_ms"]["p99"],
        "ttfc_p50": result["ttfc_overhead_ms"]["p50"],
        "ttfc_p99": result["ttfc_overhead_ms"]["p99"],
        "loadgen_cpu": result["loadgen_cpu_percent"],
    }
    if result["server_rss_steady_kb"] is not None:
        out["rss"] = result["server_rss_steady_kb"] / 1024.0
    if result["server_rss_per_session_bytes"] is not None:
        out["rss_session"] = result["server_rss_per_session_bytes"] / 1024.0
    if result["server_cpu_percent"] is not None:
        out["server_cpu"] = result["server_cpu_percent"]
    return out


def describe(result: dict[str, Any]) -> str:
    """The progress line: turns/s against the ideal, overhead, memory, CPU."""
    text = (
        f"{result['turns_per_second']:.0f} turns/s = {result['ideal_ratio']:.2f} x ideal, "
        f"overhead p99 {result['overhead_ms']['p99']:.1f} ms, "
        f"cpu server {result['server_cpu_percent']} % / loadgen {result['loadgen_cpu_percent']} %"
    )
    per_session = result["server_rss_per_session_bytes"]
    if per_session is not None:
        text += f", {per_session / 1024:.1f} KiB/session"
    if result["ready_sessions"] < result["sessions"]:
        text += f", only {result['ready_sessions']} sessions ready"
    return text + noise_and_errors(result)


def _limits_note(
    backend: str, sessions: int, results: list[dict[str, Any]], server_cpus: frozenset[int] | None
) -> str:
    """What held a (backend, N) back from the ideal, in one line.

    The server's core counts as saturated when it was busy (by the server or
    by anything else: the machine is shared) for ``SATURATED_CPU`` % or more.
    """
    ratio = Spread.of(r["ideal_ratio"] for r in results).median
    server = [r["server_cpu_percent"] for r in results if r["server_cpu_percent"] is not None]
    loadgen = max(r["loadgen_cpu_percent"] for r in results)
    server_cpu = max(server) if server else None
    core_busy: float | None = None
    if server_cpus:
        busy = [
            (r.get("cpu_busy_percent") or {}).get(str(cpu)) for r in results for cpu in server_cpus
        ]
        known = [b for b in busy if b is not None]
        core_busy = max(known) if known else None
    text = f"{backend} N={sessions:,}: {ratio:.2f} x ideal"
    if server_cpu is not None:
        text += f", server CPU {server_cpu:.0f} %"
    if core_busy is not None:
        text += f" (its core {core_busy:.0f} % busy)"
    text += f", load generator CPU {loadgen:.0f} %"
    if ratio >= 0.9:
        text += " -> close to the ideal"
    elif server_cpu is not None and server_cpu >= SATURATED_CPU:
        text += " -> the server's core is saturated: the orchestrator is the limit"
    elif core_busy is not None and core_busy >= SATURATED_CPU:
        text += " -> the server's core is saturated, partly by other processes: CPU is the limit"
    elif loadgen >= SATURATED_CPU:
        text += " -> the load generator is saturated: figures are lower bounds"
    else:
        text += " -> no core saturated: latency (queueing, scheduling) is the limit"
    ready = min(r["ready_sessions"] for r in results)
    if ready < sessions:
        text += f"; only {ready:,} of {sessions:,} sessions finished a turn before measuring"
    return text


def _point(
    series: Series,
    label: str,
    sessions: int,
    metrics: list[dict[str, float]],
    key: str,
    *,
    dashed: bool = False,
    group: str | None = None,
) -> None:
    """Add the median (min-max) of ``key`` over ``metrics`` at x = ``sessions``."""
    values = [m[key] for m in metrics if key in m]
    if values:
        spread = Spread.of(values)
        line = series.line(label, dashed=dashed, group=group)
        line.add(sessions, spread.median, spread.min, spread.max)


def hosting_series() -> tuple[Series, Series]:
    """The two plots of a hosting workload against N: turns/s, overhead p50/p99."""
    throughput = Series(
        "throughput",
        "turns/s vs concurrent sessions",
        "sessions",
        "turns/s",
        x_log=True,
        y_log=True,
    )
    overhead = Series(
        "overhead",
        "per-turn overhead (latency - think) vs sessions (p50 dashed, p99 solid)",
        "sessions",
        "ms",
        x_log=True,
        y_log=True,
    )
    return throughput, overhead


def _series(samples: list[dict[str, Any]]) -> list[Series]:
    """turns/s (achieved and ideal), overhead p50/p99 and RSS per session against N."""
    throughput, overhead = hosting_series()
    memory = Series("memory", "orchestrator RSS per session", "sessions", "KiB", x_log=True)
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for sample in samples:
        groups.setdefault((sample["backend"], sample["sessions"]), []).append(sample["metrics"])
    for (backend, sessions), group in sorted(groups.items()):
        _point(throughput, f"{backend} orchestrator", sessions, group, "turns")
        _point(throughput, f"{backend} ideal", sessions, group, "ideal", dashed=True)
        _point(overhead, f"{backend} p99", sessions, group, "overhead_p99", group=backend)
        _point(
            overhead, f"{backend} p50", sessions, group, "overhead_p50", dashed=True, group=backend
        )
        _point(memory, backend, sessions, group, "rss_session")
    return [s for s in (throughput, overhead, memory) if not s.empty]


class AgentHosting:
    """The ``agent-hosting`` scenario."""

    name = "agent-hosting"
    description = (
        "N concurrent multi-turn sessions (50-500 ms think, 20 SSE chunks per turn) on the "
        "orchestrator: turns/s vs the ideal N / mean think, overhead p50/p99, RSS per session"
    )

    def steps(self, config: RunConfig) -> int:
        """One step per (backend, N, repetition)."""
        per_backend = sum(_repetitions(config, n) for n in sessions_for(config))
        return len(config.backends) * per_backend

    def run(self, config: RunConfig, progress: Progress) -> ScenarioResult:
        """Each (backend, N, repetition) on a fresh orchestrator process."""
        pinning = procs.plan_pinning(config.pin)
        fd_limit = raise_fd_limit()  # inherited by the server and the load generator
        warmup = max(config.warmup, MIN_WARMUP)
        duration = max(config.duration, MIN_DURATION)
        counts = sessions_for(config)
        samples: list[dict[str, Any]] = []
        failures: list[str] = []
        notes = [f"pinning: {pinning.to_json()}; open-file limit {fd_limit}"]
        for backend in config.backends:
            for sessions in counts:
                if sessions + 64 > fd_limit:
                    notes.append(
                        f"{backend} N={sessions:,}: skipped, needs {sessions + 64} file "
                        f"descriptors and the limit is {fd_limit} (ulimit -n)"
                    )
                    continue
                for rep in range(1, _repetitions(config, sessions) + 1):
                    label = f"{self.name} {backend} N={sessions:,} rep {rep}"
                    progress.start(label)
                    with serve_pinned(ORCHESTRATOR_THINK, backend, config, pinning) as server:
                        opts = agentgen.AgentOptions(
                            port=server.port,
                            template=TEMPLATE_ID,
                            sessions=sessions,
                            chunks=CHUNKS,
                            think_min=THINK_MS[0],
                            think_max=THINK_MS[1],
                            seed=SEED,
                            warmup=warmup,
                            duration=duration,
                            server_pid=server.pid,
                            ramp_timeout=_ramp_timeout(sessions),
                        )
                        timeout = opts.ramp_timeout + warmup + duration + 60.0
                        result = procs.run_json(
                            agentgen.command(opts), cpus=pinning.loadgen, timeout=timeout
                        )
                    progress.finish(describe(result))
                    if result["errors"] or not result["turns"]:
                        failures.append(
                            f"{label}: {result['turns']} turns, {result['errors']} errors "
                            f"{result['error_kinds']}"
                        )
                    samples.append(
                        {
                            "backend": backend,
                            "subject": _subject(sessions),
                            "sessions": sessions,
                            "repetition": rep,
                            "command": ORCHESTRATOR_THINK.command("127.0.0.1:PORT", backend),
                            "loadgen_command": agentgen.command(opts),
                            "startup_seconds": round(server.startup_seconds, 3),
                            "metrics": _metrics(result),
                            "result": result,
                        }
                    )
        measures = summarize_measures(self.name, samples, METRICS, baseline=None)
        for backend in config.backends:
            for sessions in counts:
                group = [
                    s["result"]
                    for s in samples
                    if s["backend"] == backend and s["sessions"] == sessions
                ]
                if group:
                    notes.append(_limits_note(backend, sessions, group, pinning.server))
        noise = noise_note(samples)
        if noise:
            notes.append(noise)
        return ScenarioResult(
            name=self.name,
            rows=[],
            samples=samples,
            notes=notes,
            settings={
                "template": str(THINK_TEMPLATE.relative_to(ROOT)),
                "path": f"/v1/agents/{TEMPLATE_ID}/invocations",
                "sessions": list(counts),
                "chunks_per_turn": CHUNKS,
                "think_ms": list(THINK_MS),
                "think_distribution": "uniform integer ms, splitmix64(seed, session, turn)",
                "seed": SEED,
                "warmup": warmup,
                "duration": duration,
                "ideal": "N / mean think (0.275 s)",
                "pinning": pinning.to_json(),
                "fd_limit": fd_limit,
            },
            measures=measures,
            failures=failures,
            series=_series(samples),
        )


register(AgentHosting())
