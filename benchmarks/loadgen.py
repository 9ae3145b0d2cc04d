"""A small HTTP/1.1 keep-alive load generator, run in its own process.

``N`` connections each send the same pre-built request in a closed loop, read
the response head and its ``content-length`` body, and record the latency.
After a warm-up period, requests completed in the measured window are
counted; the result is printed as one JSON object on stdout::

    python -m benchmarks.loadgen --port 8000 --connections 64 --warmup 2 --duration 5

Each connection sends its own ``X-PPIO-Session-Id: <prefix><index>`` (default
prefix ``bench-``), so an orchestrator's AgentCore-style route
(``--path /v1/agents/<template>/invocations``) creates one session per
connection on first use and reuses it after. ``--unix PATH`` connects to a
Unix socket instead of TCP.

``--churn TEMPLATE`` measures session churn instead: each connection loops
over cycles of ``POST /v1/sessions`` (``{"template_id": TEMPLATE,
"session_id": ...}``, a fresh id per cycle), ``POST
/v1/sessions/<id>/invocations`` and ``DELETE /v1/sessions/<id>``; a latency
is one whole cycle, ``rps`` counts cycles per second, and any 2xx status is
a success.

``--create TEMPLATE`` measures session creation alone: each connection loops
over ``POST /v1/sessions`` with ``{"template_id": TEMPLATE}`` (the server
names the session) or, with ``--named``, ``{"template_id": TEMPLATE,
"session_id": "<prefix><connection>-<n>"}`` (the caller names it); sessions
are never closed, so they pile up on the server.

``--server-named TEMPLATE``: each connection first creates a session with
``POST /v1/sessions`` (the server names it) and then sends its requests to
``POST /v1/sessions/<id>/invocations`` (``--path`` is not used): on ``serve
--workers N`` the worker that accepted the connection owns the session, so
nothing is forwarded. A new connection creates a new session.

For several servers or worker sockets: ``--ports P1,P2,...`` spreads the
connections over those ports (connection ``i`` on port ``i mod k``);
``--session-ids FILE`` gives connection ``i`` the session id on line ``i``
of FILE instead of ``<prefix><i>`` (e.g. ids that one worker owns);
``--also-server-pid`` (repeatable) counts more processes as the server's
CPU, and ``--aux-pid`` (repeatable) reports others apart (an etcd cluster:
``aux_cpu_percent``), so neither counts as noise. Replies may come chunked
(a reply relayed from another node has no ``content-length``).

It also reports its own CPU use over the measured window (and the server's,
given ``--server-pid`` on Linux): a load generator near 100 % of one core is
the bottleneck and its figures are a lower bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import sys
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Self

__all__ = [
    "CpuMeter",
    "CpuUsage",
    "Options",
    "Window",
    "affinity",
    "busy_percent",
    "command",
    "generator_command",
    "latency_stats",
    "loop_name",
    "main",
    "other_cpu",
    "percentile",
    "print_result",
    "process_cpu_seconds",
    "raise_fd_limit",
    "read_session_ids",
    "run",
    "system_cpu_busy",
    "tree_cpu_seconds",
]

SATURATED_CPU = 85.0
"""Load generator CPU % (of one core) above which it is taken as the bottleneck."""


@dataclass
class Options:
    """What to send, where, and for how long."""

    host: str = "127.0.0.1"
    port: int = 8000
    path: str = "/invocations"
    body: bytes = b'{"query":"hello"}'
    connections: int = 64
    warmup: float = 2.0
    duration: float = 5.0
    server_pid: int | None = None
    io_timeout: float = 10.0
    unix: str | None = None
    """Connect to this Unix socket instead of ``host:port``."""
    session_prefix: str = "bench-"
    churn: str | None = None
    """Template id: run create / invoke / delete session cycles instead."""
    create: str | None = None
    """Template id: create sessions in a loop instead (never closed)."""
    named: bool = False
    """With ``create``: the caller names each session (else the server does)."""
    ports: tuple[int, ...] = ()
    """Spread the connections over these ports (connection ``i`` on ``ports[i % k]``)."""
    session_ids: str | None = None
    """A file of session ids, one a line: connection ``i`` uses line ``i``."""
    server_named: str | None = None
    """Template id: each connection creates its session, then uses its own route."""
    also_server_pids: tuple[int, ...] = ()
    """More processes whose CPU counts as the server's (other nodes)."""
    aux_pids: tuple[int, ...] = ()
    """Processes whose CPU is reported apart (``aux_cpu_percent``: etcd)."""


@dataclass
class Window:
    """The measured window, ``[start_ns, end_ns)`` of ``time.perf_counter_ns``, and
    what a load generator counts whatever it measures: errors inside it, connects."""

    start_ns: int
    end_ns: int
    stop: bool = False
    """Set when the window is over: connections stop looping."""
    errors: Counter[str] = field(default_factory=Counter)
    connects: int = 0

    @classmethod
    def after(cls, warmup: float, duration: float) -> Self:
        """The window opening ``warmup`` seconds from now, ``duration`` seconds long."""
        start_ns = time.perf_counter_ns() + int(warmup * 1e9)
        return cls(start_ns=start_ns, end_ns=start_ns + int(duration * 1e9))

    def error(self, kind: str) -> None:
        """Count an error of ``kind`` if it happens inside the window."""
        now = time.perf_counter_ns()
        if self.start_ns <= now < self.end_ns:
            self.errors[kind] += 1


@dataclass
class _State(Window):
    latencies: list[int] = field(default_factory=list)


def read_session_ids(path: str | None) -> list[str] | None:
    """The ids of a ``--session-ids`` file, one a line (``None``: no file)."""
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        ids = [line.strip() for line in f if line.strip()]
    if not ids:
        raise ValueError(f"{path}: no session ids")
    return ids


def build_request(opts: Options, index: int, ids: list[str] | None = None) -> bytes:
    """The request connection ``index`` sends: its own session id, keep-alive.

    ``ids``: the ``--session-ids`` (connection ``i`` takes ``ids[i % len]``).
    """
    sid = ids[index % len(ids)] if ids else f"{opts.session_prefix}{index}"
    head = (
        f"POST {opts.path} HTTP/1.1\r\n"
        f"Host: {opts.host}:{opts.port}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(opts.body)}\r\n"
        f"X-PPIO-Session-Id: {sid}\r\n"
        "\r\n"
    )
    return head.encode("latin-1") + opts.body


def _request(opts: Options, method: str, path: str, body: bytes) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {opts.host}:{opts.port}\r\n"
    if body or method == "POST":
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode("latin-1") + body


def churn_requests(opts: Options, session_id: str) -> tuple[bytes, bytes, bytes]:
    """One churn cycle: create the session, invoke it once, delete it."""
    create = json.dumps({"template_id": opts.churn, "session_id": session_id}).encode()
    return (
        _request(opts, "POST", "/v1/sessions", create),
        _request(opts, "POST", f"/v1/sessions/{session_id}/invocations", opts.body),
        _request(opts, "DELETE", f"/v1/sessions/{session_id}", b""),
    )


async def _open(opts: Options, index: int = 0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if opts.unix is not None:
        return await asyncio.wait_for(asyncio.open_unix_connection(opts.unix), opts.io_timeout)
    port = opts.ports[index % len(opts.ports)] if opts.ports else opts.port
    return await asyncio.wait_for(asyncio.open_connection(opts.host, port), opts.io_timeout)


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[bytes, bool]:
    """Send one request, read its whole response: ``(status, connection closes)``.

    The body has a ``content-length`` or comes chunked; raises ValueError
    when it has neither.
    """
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at >= 0:
        size = int(lower[at + 17 : lower.index(b"\r\n", at + 17)])
        if size:
            await reader.readexactly(size)
    elif b"\r\ntransfer-encoding: chunked" in lower:
        await _read_chunked(reader)
    else:
        raise ValueError("no content-length")
    return head[9:12], b"\r\nconnection: close" in lower


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    """Read a chunked body up to and including its trailer; the body."""
    parts = []
    while True:
        line = await reader.readuntil(b"\r\n")
        size = int(line.split(b";", 1)[0], 16)
        if not size:
            break
        parts.append((await reader.readexactly(size + 2))[:-2])  # the data, then CRLF
    while await reader.readuntil(b"\r\n") != b"\r\n":
        pass  # trailer fields
    return b"".join(parts)


async def _create_session(
    opts: Options, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bytes:
    """``--server-named``: create a session on this connection; the request for its route."""
    body = json.dumps({"template_id": opts.server_named}).encode()
    writer.write(_request(opts, "POST", "/v1/sessions", body))
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at >= 0:
        reply = await reader.readexactly(int(lower[at + 17 : lower.index(b"\r\n", at + 17)]))
    else:
        reply = await _read_chunked(reader)
    if not head[9:12].startswith(b"2"):
        raise ValueError(f"create: status {head[9:12].decode('latin-1')}")
    sid = json.loads(reply)["session_id"]
    return _request(opts, "POST", f"/v1/sessions/{sid}/invocations", opts.body)


async def _connection(
    opts: Options, state: _State, index: int, ids: list[str] | None = None
) -> None:
    """One closed-loop client; reconnects after any error until told to stop."""
    request = build_request(opts, index, ids)
    clock = time.perf_counter_ns
    latencies = state.latencies
    while not state.stop:
        try:
            reader, writer = await _open(opts, index)
        except (OSError, TimeoutError) as exc:
            state.error(f"connect: {type(exc).__name__}")
            await asyncio.sleep(0.05)  # back off; the server may be overloaded
            continue
        state.connects += 1
        try:
            if opts.server_named:
                request = await _create_session(opts, reader, writer)
            while not state.stop:
                started = clock()
                status, close = await _exchange(reader, writer, request)
                done = clock()
                if status != b"200":
                    state.error(f"status {status.decode('latin-1')}")
                elif state.start_ns <= done < state.end_ns:
                    latencies.append(done - started)
                if close:
                    break
        except (OSError, EOFError, ValueError, KeyError, asyncio.LimitOverrunError) as exc:
            if not state.stop:
                state.error(type(exc).__name__)
        finally:
            writer.close()


def create_request(opts: Options, session_id: str) -> bytes:
    """``POST /v1/sessions`` of ``opts.create``, named ``session_id`` with ``opts.named``."""
    body: dict[str, str] = {"template_id": opts.create or ""}
    if opts.named:
        body["session_id"] = session_id
    return _request(opts, "POST", "/v1/sessions", json.dumps(body).encode())


async def _churn_connection(
    opts: Options, state: _State, index: int, ids: list[str] | None = None
) -> None:
    """Closed-loop session cycles (create, invoke, delete) over one keep-alive link;
    with ``opts.create``, creations alone (one request a cycle)."""
    clock = time.perf_counter_ns
    latencies = state.latencies
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    cycle = 0
    try:
        while not state.stop:
            cycle += 1
            sid = f"{opts.session_prefix}{index}-{cycle}"
            requests = (create_request(opts, sid),) if opts.create else churn_requests(opts, sid)
            started = clock()
            ok = True
            for request in requests:
                if conn is None:
                    try:
                        conn = await _open(opts, index)
                    except (OSError, TimeoutError) as exc:
                        state.error(f"connect: {type(exc).__name__}")
                        await asyncio.sleep(0.05)
                        ok = False
                        break
                    state.connects += 1
                try:
                    status, close = await _exchange(*conn, request)
                except (OSError, EOFError, ValueError, asyncio.LimitOverrunError) as exc:
                    if not state.stop:
                        state.error(type(exc).__name__)
                    conn[1].close()
                    conn = None
                    ok = False
                    break
                if not status.startswith(b"2"):
                    state.error(f"status {status.decode('latin-1')}")
                    ok = False
                if close:
                    conn[1].close()
                    conn = None
            done = clock()
            if ok and state.start_ns <= done < state.end_ns:
                latencies.append(done - started)
    finally:
        if conn is not None:
            conn[1].close()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found += [int(child) for child in f.read().split()]
        except (OSError, ValueError):
            continue
    return found


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU time of a process and its live descendants (e.g. the orchestrator's
    process sandboxes), or ``None`` when the process is gone."""
    total = process_cpu_seconds(pid)
    if total is None:
        return None
    pending = _children(pid)
    seen = {pid}
    while pending:
        child = pending.pop()
        if child in seen:
            continue
        seen.add(child)
        total += process_cpu_seconds(child) or 0.0
        pending += _children(child)
    return total


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of another process (Linux ``/proc``), or ``None``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def system_cpu_busy() -> dict[str, tuple[int, int]] | None:
    """Busy and total ticks of each CPU since boot (Linux ``/proc/stat``), or ``None``."""
    try:
        with open("/proc/stat", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    ticks: dict[str, tuple[int, int]] = {}
    for line in lines:
        if line.startswith(b"cpu") and line[3:4].isdigit():
            name, *values = line.split()
            numbers = [int(v) for v in values[:8]]
            idle = numbers[3] + numbers[4]  # idle + iowait
            ticks[name[3:].decode()] = (sum(numbers) - idle, sum(numbers))
    return ticks


def busy_percent(
    before: dict[str, tuple[int, int]] | None, after: dict[str, tuple[int, int]] | None
) -> dict[str, float] | None:
    if before is None or after is None:
        return None
    busy: dict[str, float] = {}
    for cpu, (b1, t1) in after.items():
        b0, t0 = before.get(cpu, (b1, t1))
        busy[cpu] = round(100.0 * (b1 - b0) / (t1 - t0), 1) if t1 > t0 else 0.0
    return busy


def other_cpu(busy: dict[str, float], own: float, server: float) -> float:
    """CPU % (of one core) used by anything but this process and the server: noise."""
    return max(0.0, sum(busy.values()) - own - server)


def percentile(ordered: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list (0 when empty)."""
    if not ordered:
        return 0
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def latency_stats(values: list[int]) -> dict[str, float]:
    """p50, p90, p99, max and mean of nanosecond ``values``, in milliseconds (0 when empty)."""
    ordered = sorted(values)
    ms = 1e-6
    return {
        "p50": round(percentile(ordered, 0.50) * ms, 3),
        "p90": round(percentile(ordered, 0.90) * ms, 3),
        "p99": round(percentile(ordered, 0.99) * ms, 3),
        "max": round(percentile(ordered, 1.0) * ms, 3),
        "mean": round(sum(ordered) / len(ordered) * ms, 3) if ordered else 0.0,
    }


@dataclass
class CpuUsage:
    """CPU use over a measured window, each in percent of one core."""

    loadgen: float
    server: float | None
    """The server with its descendants (``None``: no ``--server-pid``, or gone)."""
    server_own: float | None
    """The server process alone."""
    busy: dict[str, float] | None
    """Each CPU's busy percent (``None``: no ``/proc/stat``)."""
    aux: float | None = None
    """Processes reported apart (``--aux-pid``: an etcd cluster); ``None``: none given."""

    @property
    def other(self) -> float | None:
        """Anything but the load generator, the server and the aux processes: noise."""
        if self.busy is None or self.server is None:
            return None
        return other_cpu(self.busy, self.loadgen, self.server + (self.aux or 0.0))

    def report(self, *, server_own: bool = False, busy: bool = True) -> dict[str, Any]:
        """The CPU part of a load generator's JSON result, with where it ran.

        ``server_own`` adds ``server_own_cpu_percent`` and ``busy`` the
        per-CPU ``cpu_busy_percent``, for the generators that report them.
        """
        report: dict[str, Any] = {
            "loadgen_cpu_percent": round(self.loadgen, 1),
            "server_cpu_percent": _round(self.server),
        }
        if server_own:
            report["server_own_cpu_percent"] = _round(self.server_own)
        report["loadgen_saturated"] = self.loadgen >= SATURATED_CPU
        if self.aux is not None:
            report["aux_cpu_percent"] = round(self.aux, 1)
        if busy:
            report["cpu_busy_percent"] = self.busy
        report["other_cpu_percent"] = _round(self.other)
        report["loadgen_cpus"] = affinity()
        report["event_loop"] = loop_name()
        return report


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


class CpuMeter:
    """Measures this process's, the server's and the whole machine's CPU use between
    :meth:`start` and :meth:`stop` (the server's on Linux, given its pid).

    ``also_server``: more processes counted as the server (with their
    descendants); ``aux``: processes measured apart (:attr:`CpuUsage.aux`).
    """

    def __init__(
        self,
        server_pid: int | None,
        *,
        also_server: tuple[int, ...] = (),
        aux: tuple[int, ...] = (),
    ) -> None:
        self.server_pid = server_pid
        self.also_server = also_server
        self.aux = aux
        self._start = self._snapshot()

    @staticmethod
    def _trees(pids: tuple[int, ...]) -> float:
        return sum(tree_cpu_seconds(pid) or 0.0 for pid in pids)

    def _snapshot(
        self,
    ) -> tuple[float, float, float | None, float | None, dict[str, tuple[int, int]] | None, float]:
        pid = self.server_pid
        tree = None if pid is None else tree_cpu_seconds(pid)
        if tree is not None and self.also_server:
            tree += self._trees(self.also_server)
        return (
            time.perf_counter(),
            _cpu_seconds(),
            tree,
            None if pid is None else process_cpu_seconds(pid),
            system_cpu_busy(),
            self._trees(self.aux),
        )

    def start(self) -> None:
        """Open the window now."""
        self._start = self._snapshot()

    def stop(self) -> CpuUsage:
        """Close the window now: the use since :meth:`start`."""
        wall1, own1, tree1, alone1, system1, aux1 = self._snapshot()
        wall0, own0, tree0, alone0, system0, aux0 = self._start
        window = wall1 - wall0

        def percent(before: float | None, after: float | None) -> float | None:
            return None if before is None or after is None else 100.0 * (after - before) / window

        return CpuUsage(
            loadgen=100.0 * (own1 - own0) / window,
            server=percent(tree0, tree1),
            server_own=percent(alone0, alone1),
            busy=busy_percent(system0, system1),
            aux=percent(aux0, aux1) if self.aux else None,
        )


async def run(opts: Options) -> dict[str, Any]:
    """Drive the server for ``warmup + duration`` seconds; return the result."""
    state = _State.after(opts.warmup, opts.duration)
    ids = read_session_ids(opts.session_ids)
    client = _churn_connection if opts.churn or opts.create else _connection
    tasks = [asyncio.create_task(client(opts, state, i, ids)) for i in range(opts.connections)]
    meter = CpuMeter(opts.server_pid, also_server=opts.also_server_pids, aux=opts.aux_pids)
    try:
        await asyncio.sleep(opts.warmup)
        meter.start()
        await asyncio.sleep(max(0.0, (state.end_ns - time.perf_counter_ns()) / 1e9))
        cpu = meter.stop()
        state.stop = True
        _, pending = await asyncio.wait(tasks, timeout=opts.io_timeout)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    ordered = sorted(state.latencies)
    return {
        "requests": len(ordered),
        "errors": sum(state.errors.values()),
        "error_kinds": dict(state.errors),
        "duration": round(opts.duration, 3),
        "rps": round(len(ordered) / opts.duration, 1),
        **latency_stats(ordered),
        "connections": opts.connections,
        "mode": "churn" if opts.churn else "create" if opts.create else "requests",
        "connects": state.connects,
        "stuck_connections": len(pending),
        "warmup": opts.warmup,
        **cpu.report(server_own=True),
    }


def raise_fd_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit; the new soft limit.

    One keep-alive connection is one descriptor on each side: 10,000 sessions
    need more than the usual soft limit of 1,024. Children inherit the limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return soft
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target


def affinity() -> list[int] | None:
    """The CPUs this process may run on (``None``: unknown)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def loop_name() -> str:
    """The running event loop's package: ``uvloop`` or ``asyncio``."""
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def generator_command(
    module: str,
    host: str,
    port: int,
    warmup: float,
    duration: float,
    server_pid: int | None,
    *options: str,
) -> list[str]:
    """The command line running load generator ``module`` (``benchmarks.loadgen``,
    ``benchmarks.streamgen``, ...) in a fresh process: the options they all take
    (target, window, server pid) around its own ``options``."""
    argv = [sys.executable, "-m", module, "--host", host, "--port", str(port), *options]
    argv += ["--warmup", str(warmup), "--duration", str(duration)]
    if server_pid is not None:
        argv += ["--server-pid", str(server_pid)]
    return argv


def command(opts: Options) -> list[str]:
    """The command line that runs ``opts`` in a fresh process (harness side)."""
    argv = generator_command(
        "benchmarks.loadgen",
        opts.host,
        opts.port,
        opts.warmup,
        opts.duration,
        opts.server_pid,
        "--path",
        opts.path,
        "--body",
        opts.body.decode(),
        "--connections",
        str(opts.connections),
    )
    if opts.unix is not None:
        argv += ["--unix", opts.unix]
    if opts.session_prefix != Options.session_prefix:
        argv += ["--session-prefix", opts.session_prefix]
    if opts.churn is not None:
        argv += ["--churn", opts.churn]
    if opts.create is not None:
        argv += ["--create", opts.create]
    if opts.named:
        argv.append("--named")
    if opts.ports:
        argv += ["--ports", ",".join(str(port) for port in opts.ports)]
    if opts.session_ids is not None:
        argv += ["--session-ids", opts.session_ids]
    if opts.server_named is not None:
        argv += ["--server-named", opts.server_named]
    for pid in opts.also_server_pids:
        argv += ["--also-server-pid", str(pid)]
    for pid in opts.aux_pids:
        argv += ["--aux-pid", str(pid)]
    return argv


def _parse(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/invocations")
    p.add_argument("--body", default='{"query":"hello"}', help="JSON request body")
    p.add_argument("-c", "--connections", type=int, default=64)
    p.add_argument("--warmup", type=float, default=2.0, help="seconds not measured")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    p.add_argument(
        "--server-pid", type=int, help="report this process's CPU use too (with its children)"
    )
    p.add_argument("--unix", metavar="PATH", help="connect to this Unix socket instead")
    p.add_argument(
        "--session-prefix", default="bench-", help="X-PPIO-Session-Id is PREFIX<connection>"
    )
    p.add_argument(
        "--churn", metavar="TEMPLATE", help="create / invoke / delete session cycles instead"
    )
    p.add_argument("--create", metavar="TEMPLATE", help="create sessions in a loop instead")
    p.add_argument(
        "--named", action="store_true", help="with --create: the caller names each session"
    )
    p.add_argument("--ports", metavar="P1,P2,...", help="spread the connections over these ports")
    p.add_argument(
        "--session-ids", metavar="FILE", help="connection i uses the session id on line i"
    )
    p.add_argument(
        "--server-named",
        metavar="TEMPLATE",
        help="each connection creates its session, then posts to /v1/sessions/<id>/invocations",
    )
    p.add_argument(
        "--also-server-pid",
        type=int,
        action="append",
        default=[],
        metavar="PID",
        help="count this process's CPU as the server's too (repeatable)",
    )
    p.add_argument(
        "--aux-pid",
        type=int,
        action="append",
        default=[],
        metavar="PID",
        help="report this process's CPU apart, as aux_cpu_percent (repeatable)",
    )
    a = p.parse_args(argv)
    if a.connections < 1 or a.duration <= 0 or a.warmup < 0:
        p.error("need --connections >= 1, --duration > 0, --warmup >= 0")
    if a.churn and a.create:
        p.error("--churn and --create exclude each other")
    if a.named and not a.create:
        p.error("--named goes with --create")
    try:
        ports = tuple(int(x) for x in a.ports.split(",")) if a.ports else ()
    except ValueError:
        p.error(f"--ports {a.ports!r}: expected comma-separated integers")
    return Options(
        host=a.host,
        port=a.port,
        path=a.path,
        body=a.body.encode(),
        connections=a.connections,
        warmup=a.warmup,
        duration=a.duration,
        server_pid=a.server_pid,
        unix=a.unix,
        session_prefix=a.session_prefix,
        churn=a.churn,
        create=a.create,
        named=a.named,
        ports=ports,
        session_ids=a.session_ids,
        server_named=a.server_named,
        also_server_pids=tuple(a.also_server_pid),
        aux_pids=tuple(a.aux_pid),
    )


def print_result(main: Coroutine[Any, Any, dict[str, Any]]) -> int:
    """Run a load generator's ``main`` coroutine on uvloop (plain asyncio when uvloop
    is not installed) and print its result as one JSON line on stdout; exit code 0."""
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(main)
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            result = runner.run(main)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: print the result as JSON on stdout."""
    return print_result(run(_parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
