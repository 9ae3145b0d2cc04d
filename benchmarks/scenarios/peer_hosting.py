"""``peer-hosting``: the ``agent-hosting`` workload on Ray, next to the orchestrator.

What a user would pick instead of the orchestrator to host many stateful
agent sessions in Python: Ray actors with session affinity. The peer is
``ray==2.60.0`` (the minimal install, no ``[serve]``) in its own throw-away
virtual environment (:mod:`benchmarks.peers`), and ``benchmarks/peers/ray_agent.py``
run by that environment's Python is both its hosted agent and its load
generator:

* the server: a Ray head (``ray start --head --block --num-cpus 1``, GCS,
  raylet, the head's helper processes and the actor's worker process),
  pinned to the server CPU like the orchestrator, with one async actor
  holding every session in a dict keyed by session id (session affinity:
  a session is always served by the actor holding its state); a turn is an
  async-generator actor method (a Ray streaming generator) that counts the
  session's turns, awaits the think time and yields 20 chunks, each reaching
  the caller as its own object;
* the load generator: a Ray driver pinned to the other CPU, connected to
  the head, running :mod:`benchmarks.agentgen`'s workload turn for turn
  (same seed and think times, priming, release ramp, window and figures)
  through Ray's Python API: a turn is an actor call over Ray's RPC (gRPC),
  not an HTTP request; there is no HTTP server, SSE or socket per session.

A second Ray subject (full runs only) answers each turn in one reply (the
20 chunks as one list, no stream: its first chunk comes with the last),
to tell the cost of Ray's streaming from the cost of an actor call.

The orchestrator subject is exactly ``agent-hosting``'s (asyncio: uvloop,
hypercorn, HTTP/1.1 keep-alive connection and SSE per session, driven by
agentgen). All subjects of an N alternate within each repetition, each on a
fresh server. N = 100 and 1,000 (50 with ``--quick``;
``BENCH_PEER_SESSIONS=100,1000`` picks others); asyncio only (Ray has no
trio). Figures: those of ``agent-hosting``, plus CPU per turn on the server
side, on the load generator side and in total (the driver does Ray's client
half of each call, which agentgen's HTTP client does far more cheaply), and
the orchestrator's figures as ratios to Ray's streaming subject.
Reported, not judged.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import agentgen, peers, procs
from ..core import (
    Measure,
    Metric,
    Progress,
    RunConfig,
    ScenarioResult,
    Series,
    Spread,
    summarize_measures,
)
from ..loadgen import SATURATED_CPU, raise_fd_limit
from ..servers import RunningServer, ServerError, free_port
from . import register
from ._loadtest import noise_note, serve_pinned
from .agent_hosting import (
    CHUNKS,
    METRICS,
    MIN_DURATION,
    MIN_WARMUP,
    ORCHESTRATOR_THINK,
    SEED,
    TEMPLATE_ID,
    THINK_MS,
    _metrics,
    _point,
    _ramp_timeout,
    describe,
    hosting_series,
    session_counts,
)

__all__ = ["PeerHosting"]

SESSIONS = (100, 1_000)
QUICK_SESSIONS = (50,)
ENV_SESSIONS = "BENCH_PEER_SESSIONS"
BACKEND = "asyncio"

RAY_ENV = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0", "RAY_USAGE_STATS_ENABLED=0")
"""Ray's own switch for a one-machine cluster (its node address is 127.0.0.1, not the
machine's outward address: nothing leaves loopback), and no usage reporting."""
OBJECT_STORE_BYTES = 100 * 1024 * 1024
"""Ray's shared-memory object store: 100 MiB (its default is 30 % of RAM); chunks are
small and travel inline, so it stays nearly empty."""
RAY_ACTORS = 1
"""Session-hosting actors: one worker process, like the orchestrator's one process on
its one core (a second actor would share that core)."""
HEAD_READY = "Ray runtime started"

METRICS_PER_TURN = [
    Metric("server_ms_turn", "server CPU per turn", "ms", digits=2),
    Metric("client_ms_turn", "load generator CPU per turn", "ms", digits=2),
    Metric("total_ms_turn", "server + load generator CPU per turn", "ms", digits=2),
]
ALL_METRICS = METRICS + METRICS_PER_TURN
COMPARED = (
    "turns/s",
    "overhead p50 (latency - think)",
    "overhead p99 (latency - think)",
    "first chunk p99 (- think)",
    "server CPU per turn",
    "server + load generator CPU per turn",
)
"""The orchestrator's figures also given as a ratio to Ray's streaming subject's."""


@dataclass(frozen=True)
class _Kind:
    """A subject: the orchestrator, or Ray streaming or replying once."""

    name: str
    ray: bool = False
    reply: bool = False
    quick: bool = True
    """Also measured with ``--quick``."""

    def label(self, sessions: int) -> str:
        return f"{self.name} N={sessions:,}"


ORCHESTRATOR_KIND = _Kind("orchestrator")
RAY_STREAM = _Kind(f"{peers.RAY.label} stream", ray=True)
RAY_REPLY = _Kind(f"{peers.RAY.label} one reply", ray=True, reply=True, quick=False)
KINDS = (ORCHESTRATOR_KIND, RAY_STREAM, RAY_REPLY)


def sessions_for(config: RunConfig) -> tuple[int, ...]:
    """The N to measure: ``$BENCH_PEER_SESSIONS`` or the quick or full defaults."""
    return session_counts(ENV_SESSIONS, QUICK_SESSIONS if config.quick else SESSIONS)


def _kinds(config: RunConfig) -> tuple[_Kind, ...]:
    return tuple(k for k in KINDS if k.quick or not config.quick)


def _short_tempdir() -> Path:
    """A fresh directory with a short path: Ray puts Unix sockets in it (108-byte limit)."""
    base = "/tmp" if Path("/tmp").is_dir() else None
    return Path(tempfile.mkdtemp(prefix="ppio-ray-", dir=base))


def _head_command(env: peers.PeerEnv, port: str, agent_port: str, temp: str) -> list[str]:
    """``ray start --head`` in the foreground (``--block``: its processes are its children)."""
    return [
        "env",
        *RAY_ENV,
        str(env.path / "bin" / "ray"),
        "start",
        "--head",
        "--block",
        "--port",
        port,
        "--num-cpus",
        "1",
        "--include-dashboard",
        "false",
        "--disable-usage-stats",
        "--object-store-memory",
        str(OBJECT_STORE_BYTES),
        "--dashboard-agent-listen-port",
        agent_port,
        "--temp-dir",
        temp,
    ]


@contextlib.contextmanager
def ray_head(
    env: peers.PeerEnv, config: RunConfig, pinning: procs.Pinning
) -> Iterator[RunningServer]:
    """A Ray head pinned to the server CPU, ready; stopped (with every process it
    started) however the block ends. ``port`` is its GCS port."""
    port = free_port()
    log = config.workdir / f"ray-head-{port}.log"
    temp = _short_tempdir()
    argv = _head_command(env, str(port), str(free_port()), str(temp))
    wait = max(config.startup_timeout, 60.0)
    started = time.perf_counter()
    try:
        with procs.running(
            argv, cpus=pinning.server, log=log, stop_timeout=config.stop_timeout
        ) as proc:
            deadline = time.monotonic() + wait
            while HEAD_READY not in log.read_text(errors="replace"):
                if time.monotonic() >= deadline:
                    raise ServerError(f"ray head not ready after {wait:g} s\n{procs.tail(log)}")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    code = proc.wait(0.1)
                    raise ServerError(f"ray head exited with code {code}\n{procs.tail(log)}")
            yield RunningServer(proc.pid, port, time.perf_counter() - started, log)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _driver_command(
    env: peers.PeerEnv,
    head: RunningServer,
    kind: _Kind,
    sessions: int,
    warmup: float,
    duration: float,
) -> list[str]:
    argv = ["env", *RAY_ENV, str(env.python), str(peers.RAY.agent)]
    argv += ["--address", f"127.0.0.1:{head.port}", "--sessions", str(sessions)]
    argv += ["--actors", str(RAY_ACTORS), "--chunks", str(CHUNKS), "--seed", str(SEED)]
    argv += ["--think-min", str(THINK_MS[0]), "--think-max", str(THINK_MS[1])]
    argv += ["--warmup", str(warmup), "--duration", str(duration)]
    argv += ["--server-pid", str(head.pid), "--ramp-timeout", str(_ramp_timeout(sessions))]
    return argv + (["--reply"] if kind.reply else [])


def _per_turn(metrics: dict[str, float], result: dict[str, Any]) -> dict[str, float]:
    """``metrics`` with CPU milliseconds per turn (server, load generator, both)."""
    rate = result["turns_per_second"]
    if not rate:
        return metrics
    client = result["loadgen_cpu_percent"] * 10.0 / rate
    metrics["client_ms_turn"] = client
    if result["server_cpu_percent"] is not None:
        server = result["server_cpu_percent"] * 10.0 / rate
        metrics["server_ms_turn"] = server
        metrics["total_ms_turn"] = server + client
    return metrics


def _limits(label: str, results: list[dict[str, Any]], server_cpus: frozenset[int] | None) -> str:
    """What held ``label`` back from the ideal, in one line."""
    ratio = Spread.of(r["ideal_ratio"] for r in results).median
    server = max((r["server_cpu_percent"] or 0.0) for r in results)
    loadgen = max(r["loadgen_cpu_percent"] for r in results)
    busy = [
        (r.get("cpu_busy_percent") or {}).get(str(cpu))
        for r in results
        for cpu in (server_cpus or ())
    ]
    known = [b for b in busy if b is not None]
    text = f"{label}: {ratio:.2f} x ideal, server CPU {server:.0f} %"
    if known:
        text += f" (its core {max(known):.0f} % busy)"
    text += f", load generator CPU {loadgen:.0f} %"
    if ratio >= 0.9:
        return text + " -> close to the ideal"
    limits = []
    if server >= SATURATED_CPU or (known and max(known) >= SATURATED_CPU):
        limits.append("the server's core is saturated")
    if loadgen >= SATURATED_CPU:
        limits.append("the load generator is saturated (figures are lower bounds)")
    return text + " -> " + ("; ".join(limits) if limits else "no core saturated: latency")


def _compare(measures: list[Measure], counts: tuple[int, ...]) -> None:
    """The orchestrator's :data:`COMPARED` figures as ratios to Ray streaming's, per N."""
    index = {(m.subject, m.metric): m for m in measures}
    for sessions in counts:
        peer = RAY_STREAM.label(sessions)
        for metric in COMPARED:
            ours = index.get((ORCHESTRATOR_KIND.label(sessions), metric))
            theirs = index.get((peer, metric))
            if ours is None or theirs is None or not theirs.value.median:
                continue
            ours.baseline = peer
            ours.ratio = ours.value.median / theirs.value.median


def _series(samples: list[dict[str, Any]]) -> list[Series]:
    """turns/s (and the ideal), overhead p50/p99 and CPU per turn against N, per subject."""
    throughput, overhead = hosting_series()
    cpu = Series(
        "cpu-per-turn",
        "CPU per turn, server + load generator (server alone dashed)",
        "sessions",
        "ms",
        x_log=True,
        y_log=True,
    )
    groups: dict[tuple[str, int], list[dict[str, float]]] = {}
    for sample in samples:
        groups.setdefault((sample["kind"], sample["sessions"]), []).append(sample["metrics"])
    for (kind, sessions), group in sorted(groups.items()):
        _point(throughput, kind, sessions, group, "turns")
        _point(throughput, "ideal", sessions, group, "ideal", dashed=True)
        _point(overhead, f"{kind} p99", sessions, group, "overhead_p99", group=kind)
        _point(overhead, f"{kind} p50", sessions, group, "overhead_p50", dashed=True, group=kind)
        _point(cpu, kind, sessions, group, "total_ms_turn", group=kind)
        _point(cpu, f"{kind} server", sessions, group, "server_ms_turn", dashed=True, group=kind)
    return [s for s in (throughput, overhead, cpu) if not s.empty]


class PeerHosting:
    """The ``peer-hosting`` scenario."""

    name = "peer-hosting"
    description = (
        "agent-hosting's workload (N sessions, 50-500 ms think, 20 chunks a turn) on Ray "
        "actors driven through Ray's API vs the orchestrator over HTTP/SSE: turns/s, "
        "overhead, CPU per turn"
    )

    def steps(self, config: RunConfig) -> int:
        """One step per (N, repetition, subject), on asyncio only."""
        if BACKEND not in config.backends:
            return 0
        return len(sessions_for(config)) * config.repetitions * len(_kinds(config))

    def run(self, config: RunConfig, progress: Progress) -> ScenarioResult:
        """Every subject of an N in turn, each on a fresh server, ``repetitions`` times."""
        if BACKEND not in config.backends:
            return ScenarioResult(
                self.name, [], [], notes=["skipped: Ray and the peer run on asyncio only"]
            )
        pinning = procs.plan_pinning(config.pin)
        fd_limit = raise_fd_limit()
        warmup = max(config.warmup, MIN_WARMUP)
        duration = max(config.duration, MIN_DURATION)
        counts = sessions_for(config)
        kinds = _kinds(config)
        found = peers.ensure(peers.RAY, progress.note)
        env = found if isinstance(found, peers.PeerEnv) else None
        notes = [f"pinning: {pinning.to_json()}; open-file limit {fd_limit}"]
        if env is None:
            notes.append(str(found))
        samples: list[dict[str, Any]] = []
        failures: list[str] = []
        for sessions in counts:
            if sessions + 64 > fd_limit:
                notes.append(f"N={sessions:,}: skipped, needs {sessions + 64} file descriptors")
                continue
            for rep in range(1, config.repetitions + 1):
                for kind in kinds:
                    label = f"{self.name} {kind.label(sessions)} rep {rep}"
                    progress.start(label)
                    if kind.ray and env is None:
                        progress.finish("skipped: Ray not installed (see notes)")
                        continue
                    try:
                        sample = self._sample(
                            kind, sessions, env, config, pinning, warmup, duration
                        )
                    except (ServerError, RuntimeError) as exc:
                        if not kind.ray:
                            raise
                        progress.finish(f"failed: {str(exc).splitlines()[0]}")
                        failures.append(f"{label}: {exc}")
                        continue
                    result = sample["result"]
                    progress.finish(describe(result))
                    if result["errors"] or not result["turns"]:
                        failures.append(
                            f"{label}: {result['turns']} turns, {result['errors']} errors "
                            f"{result['error_kinds']}"
                        )
                    sample["repetition"] = rep
                    samples.append(sample)
        measures = summarize_measures(self.name, samples, ALL_METRICS, baseline=None)
        _compare(measures, counts)
        for sessions in counts:
            for kind in kinds:
                group = [
                    s["result"]
                    for s in samples
                    if s["kind"] == kind.name and s["sessions"] == sessions
                ]
                if group:
                    notes.append(_limits(kind.label(sessions), group, pinning.server))
        if env is not None:
            notes.append(
                f"peer {peers.RAY.description}: {env.versions}; {RAY_ACTORS} actor, "
                f"`ray start --head --num-cpus 1` pinned with all its processes to the server "
                f"CPU, the driver (load generator) to the other; each turn is an actor call "
                f"over Ray's RPC, not HTTP: no HTTP server, SSE or connection per session"
            )
        noise = noise_note(samples)
        if noise:
            notes.append(noise)
        return ScenarioResult(
            name=self.name,
            rows=[],
            samples=samples,
            notes=notes,
            settings={
                "sessions": list(counts),
                "subjects": [k.name for k in kinds],
                "chunks_per_turn": CHUNKS,
                "think_ms": list(THINK_MS),
                "seed": SEED,
                "warmup": warmup,
                "duration": duration,
                "ideal": "N / mean think (0.275 s)",
                "pinning": pinning.to_json(),
                "ray_actors": RAY_ACTORS,
                "ray_object_store_bytes": OBJECT_STORE_BYTES,
                "peer": env.to_json() if env is not None else str(found),
            },
            measures=measures,
            failures=failures,
            series=_series(samples),
        )

    def _sample(
        self,
        kind: _Kind,
        sessions: int,
        env: peers.PeerEnv | None,
        config: RunConfig,
        pinning: procs.Pinning,
        warmup: float,
        duration: float,
    ) -> dict[str, Any]:
        """One measurement of ``kind`` at ``sessions`` on a fresh server."""
        timeout = _ramp_timeout(sessions) + warmup + duration + 90.0
        if kind.ray:
            assert env is not None
            with ray_head(env, config, pinning) as head:
                command = _driver_command(env, head, kind, sessions, warmup, duration)
                result = procs.run_json(command, cpus=pinning.loadgen, timeout=timeout)
            server, loadgen = head, command
            server_command = _head_command(env, "PORT", "PORT", "TMPDIR")
        else:
            with serve_pinned(ORCHESTRATOR_THINK, BACKEND, config, pinning) as server:
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
                loadgen = agentgen.command(opts)
                result = procs.run_json(loadgen, cpus=pinning.loadgen, timeout=timeout)
            server_command = ORCHESTRATOR_THINK.command("127.0.0.1:PORT", BACKEND)
        return {
            "backend": BACKEND,
            "subject": kind.label(sessions),
            "kind": kind.name,
            "sessions": sessions,
            "command": server_command,
            "loadgen_command": loadgen,
            "startup_seconds": round(server.startup_seconds, 3),
            "metrics": _per_turn(_metrics(result), result),
            "result": result,
        }


register(PeerHosting())
