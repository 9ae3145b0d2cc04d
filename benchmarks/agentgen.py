"""Multi-turn streaming sessions against the orchestrator, run in its own process.

``N`` sessions, each one HTTP/1.1 keep-alive connection with its own
``X-PPIO-Session-Id``, loop over turns on the AgentCore-style route
``POST /v1/agents/<template>/invocations`` (the first turn creates the
session). Each turn's body names a think time that the agent awaits (a
simulated model call) before it streams ``chunks`` Server-Sent Events::

    python -m benchmarks.agentgen --port 8900 --template bench-think --sessions 1000 \\
        --warmup 2 --duration 5 --server-pid PID

Think times are uniform integers in ``[think_min, think_max]`` milliseconds,
decided by the seed, the session index and the turn number alone (see
:func:`think_ms`), so every run sends the same sequence. With no overhead at
all, a session completes ``1 / mean think`` turns per second, so the ideal is
``N / mean think`` turns per second; the result reports the achieved rate as
a ratio to it, and per turn the latency minus its own think time (what the
orchestrator, the HTTP server and the stream add) and the time to the first
chunk minus the think time.

Ramp-up, in two steps. Priming: every session connects and sends one turn
without think time and with one chunk (which creates the session), at most
``--connect-concurrency`` at a time, each counting until its turn is
answered (a connect completes in the kernel before the server accepts it,
and its listen backlog is small). Release: 64 primed sessions start their
loop of turns, staggered over the longest think time, and each finished
turn releases one more, so that sessions join at the rate the server serves
them and their turns are spread in time as in service (had all started at
once, their turns would march in step for a long while). Each step waits at
most ``--ramp-timeout`` seconds (then measures anyway: ``ready_sessions``,
``released_in_time``). The measured window opens ``--warmup`` seconds after
the release; a turn counts when it completes inside the window. The
server's RSS (``/proc/PID/status``) is read before the first connection and
every 0.25 s in the window. One JSON object is printed on stdout.

``--server-named``: each session is created by ``POST /v1/sessions``
(``{"template_id": ...}``, the server names it) as its priming request, and
its turns go to ``POST /v1/sessions/<id>/invocations`` over the same
connection: on ``serve --workers N`` the worker that accepted the connection
creates and owns the session, so no turn is forwarded (while the connection
lasts). ``--unix PATH`` connects to a Unix socket instead of TCP (one worker of
``serve --workers``: ``<data dir>/run/w<i>.sock``), and ``--session-ids
FILE`` names session ``i`` by line ``i`` of FILE instead of
``agent-<i>`` (e.g. ids that one worker owns). The server's RSS and CPU
are those of ``--server-pid`` with its descendants (a supervisor's
workers).

It is asyncio (uvloop when installed) with one :class:`asyncio.Protocol` per
session and no task per turn: the response is parsed in ``data_received``
and the next turn is written from there, so that the generator stays far
cheaper per turn than the server it drives.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, cast

from .loadgen import (
    CpuMeter,
    _children,
    generator_command,
    latency_stats,
    print_result,
    raise_fd_limit,
    read_session_ids,
)

__all__ = ["AgentOptions", "command", "main", "run", "think_ms"]

_MASK = (1 << 64) - 1
_NEVER = 1 << 62
_FIRST = 64
"""Sessions released at once when all are primed; each finished turn releases one more."""
_RESERVOIR = 1000
"""Turns kept verbatim in the JSON (a fixed-seed uniform sample of the window)."""

# Response parser states.
_IDLE, _HEAD, _SIZE, _DATA, _DATA_END, _TRAILER, _BODY = range(7)


def _mix(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of ``x``."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def think_ms(seed: int, session: int, turn: int, low: int = 50, high: int = 500) -> int:
    """The think time of ``turn`` of ``session``: uniform in ``[low, high]`` ms.

    >>> think_ms(1, 0, 1) == think_ms(1, 0, 1)
    True
    >>> all(50 <= think_ms(7, s, t) <= 500 for s in range(20) for t in range(20))
    True
    """
    return low + _mix(_mix(_mix(seed) ^ session) ^ turn) % (high - low + 1)


@dataclass
class AgentOptions:
    """Where to connect, how many sessions, what each turn asks for, how long."""

    host: str = "127.0.0.1"
    port: int = 8900
    template: str = "bench-think"
    sessions: int = 100
    chunks: int = 20
    think_min: int = 50
    think_max: int = 500
    seed: int = 1
    warmup: float = 2.0
    duration: float = 5.0
    server_pid: int | None = None
    connect_concurrency: int = 64
    connect_timeout: float = 10.0
    ramp_timeout: float = 60.0
    session_prefix: str = "agent-"
    unix: str | None = None
    """Connect to this Unix socket instead of ``host:port``."""
    session_ids: str | None = None
    """A file of session ids, one a line: session ``i`` uses line ``i``."""
    server_named: bool = False
    """Create each session with ``POST /v1/sessions`` (the server names it)."""

    @property
    def mean_think(self) -> float:
        """Mean think time in seconds (the distribution's, not a sample's)."""
        return (self.think_min + self.think_max) / 2000.0

    @property
    def ideal(self) -> float:
        """Turns per second with no overhead at all: ``sessions / mean think``."""
        return self.sessions / self.mean_think


@dataclass
class _Window:
    """Shared state: the measured window and what was recorded in it."""

    opts: AgentOptions
    start_ns: int = _NEVER
    end_ns: int = _NEVER
    stop: bool = False
    ready: int = 0
    """Sessions primed: created by a first turn without think time."""
    all_ready: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: deque[_Session] = field(default_factory=deque)
    """Primed sessions not released into their loop yet (see :func:`run`)."""
    all_released: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    connects: int = 0
    latency: list[int] = field(default_factory=list)
    overhead: list[int] = field(default_factory=list)
    ttfc: list[int] = field(default_factory=list)
    ttfc_overhead: list[int] = field(default_factory=list)
    think: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    ramp_errors: Counter[str] = field(default_factory=Counter)
    sessions: list[_Session] = field(default_factory=list)

    def release(self) -> None:
        """Release the next waiting session into its loop of turns."""
        if self.waiting:
            self.waiting.popleft().release()
            if not self.waiting:
                self.all_released.set()

    def primed(self) -> None:
        """One more session is primed."""
        self.ready += 1
        if self.ready == self.opts.sessions:
            self.all_ready.set()

    def error(self, kind: str) -> None:
        now = time.perf_counter_ns()
        if self.start_ns <= now < self.end_ns:
            self.errors[kind] += 1
        elif now < self.start_ns:
            self.ramp_errors[kind] += 1


class _Session(asyncio.Protocol):
    """One session: turns back to back over one connection, each SSE reply parsed as it
    comes. The same object serves the session's next connection if one is lost."""

    def __init__(self, window: _Window, index: int, name: str | None = None) -> None:
        opts = window.opts
        self.window = window
        self.index = index
        self.loop = asyncio.get_running_loop()
        sid = name or f"{opts.session_prefix}{index}"
        self.capture: bytearray | None = None
        """The body of the reply under way, while one is kept (``--server-named``)."""
        self.host_line = f"Host: {opts.host}:{opts.port}\r\n"
        self.head = (
            f"POST /v1/agents/{opts.template}/invocations HTTP/1.1\r\n"
            f"Host: {opts.host}:{opts.port}\r\n"
            "Content-Type: application/json\r\n"
            "Accept: text/event-stream\r\n"
            f"X-PPIO-Session-Id: {sid}\r\n"
        ).encode("latin-1")
        self.transport: asyncio.Transport | None = None
        self.turn = 0
        self.primed = False
        self.released = False
        self.admitted: asyncio.Future[None] | None = None
        self.wake: asyncio.Future[None] | None = None
        self.expect = 0
        self.think_ns = 0
        self.sent = 0
        self.first = 0
        self.now = 0
        self.chunks = 0
        self.done = False
        self.failed: str | None = None
        self.status = b""
        self.close_after = False
        self.remaining = 0
        self.state = _IDLE
        self.buf = bytearray()
        self.sse = bytearray()
        self.lost: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.window.connects += 1
        self.state = _IDLE
        self.buf.clear()
        self.send_turn()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.state != _IDLE and not self.window.stop:
            self.window.error(f"connection lost: {type(exc).__name__ if exc else 'EOF'}")
        self.state = _IDLE
        for future in (self.admitted, self.lost):
            if future is not None and not future.done():
                future.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.now = time.perf_counter_ns()
        buf = self.buf
        buf += data
        while buf:
            state = self.state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buf[: end + 2]).lower()
                del buf[: end + 4]
                self.status = head[9:12]
                self.close_after = b"\r\nconnection: close" in head
                if b"\r\ntransfer-encoding: chunked" in head:
                    self.state = _SIZE
                else:
                    at = head.find(b"\r\ncontent-length:")
                    length = int(head[at + 17 : head.index(b"\r\n", at + 17)]) if at >= 0 else 0
                    self.remaining = length
                    self.state = _BODY
                    if not length:
                        self.finish()
            elif state == _SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buf[:end]).split(b";", 1)[0], 16)
                del buf[: end + 2]
                if size:
                    self.remaining = size
                    self.state = _DATA
                else:
                    self.state = _TRAILER
            elif state == _DATA:
                n = min(self.remaining, len(buf))
                if self.capture is not None:
                    self.capture += buf[:n]
                self.events(buf[:n])
                del buf[:n]
                self.remaining -= n
                if not self.remaining:
                    self.state = _DATA_END
            elif state == _DATA_END:
                if len(buf) < 2:
                    return
                del buf[:2]
                self.state = _SIZE
            elif state == _TRAILER:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[: end + 2]
                if end == 0:
                    self.finish()
            elif state == _BODY:
                n = min(self.remaining, len(buf))
                if self.capture is not None:
                    self.capture += buf[:n]
                del buf[:n]
                self.remaining -= n
                if not self.remaining:
                    self.finish()
            else:
                # Bytes while no turn is in flight: the server broke the protocol.
                self.window.error("unexpected bytes")
                buf.clear()
                self.close()
                return

    # -- turns --------------------------------------------------------------

    def events(self, data: bytearray) -> None:
        """Scan de-chunked SSE bytes: count chunk events, note the first and the end."""
        sse = self.sse
        sse += data
        while True:
            end = sse.find(b"\n\n")
            if end < 0:
                return
            if sse.startswith(b"event: done"):
                self.done = True
            elif sse.startswith(b"event: error"):
                self.failed = "error event"
            elif sse.find(b"data:", 0, end) >= 0:
                self.chunks += 1
                if self.chunks == 1:
                    self.first = self.now
            del sse[: end + 2]

    def send_turn(self) -> None:
        """Write the next turn's request (its think time decided by seed, session, turn).

        The first turn primes the session: it creates it, without think time
        and with one chunk. Later turns wait until the session is released.
        """
        transport = self.transport
        window = self.window
        if transport is None or self.state != _IDLE or window.stop:
            return  # (a delayed retry finding a turn already under way)
        opts = window.opts
        if not self.primed and opts.server_named:
            self.send_create(transport)
            return
        if not self.primed:
            think, chunks = 0, 1
        elif not self.released:
            return
        else:
            self.turn += 1
            think = think_ms(opts.seed, self.index, self.turn, opts.think_min, opts.think_max)
            chunks = opts.chunks
        body = b'{"think_ms":%d,"chunks":%d,"seed":%d,"turn":%d}' % (
            think,
            chunks,
            opts.seed,
            self.turn,
        )
        self.think_ns = think * 1_000_000
        self.expect = chunks
        self.chunks = 0
        self.first = 0
        self.done = False
        self.failed = None
        self.sse.clear()
        self.state = _HEAD
        self.sent = time.perf_counter_ns()
        transport.write(self.head + b"Content-Length: %d\r\n\r\n" % len(body) + body)

    def send_create(self, transport: asyncio.Transport) -> None:
        """The priming request with ``--server-named``: create the session."""
        body = b'{"template_id":"%s"}' % self.window.opts.template.encode()
        self.expect = 0
        self.capture = bytearray()
        self.state = _HEAD
        self.sent = time.perf_counter_ns()
        transport.write(
            b"POST /v1/sessions HTTP/1.1\r\n"
            + self.host_line.encode("latin-1")
            + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
        )

    def created(self) -> bool:
        """The create reply is in: turn to the session's own route; False on failure."""
        capture, self.capture = self.capture, None
        if self.status not in (b"200", b"201") or capture is None:
            self.window.error(f"create status {self.status.decode('latin-1')}")
            return False
        try:
            sid = json.loads(bytes(capture))["session_id"]
        except (ValueError, KeyError, TypeError):
            self.window.error("create: no session_id")
            return False
        self.head = (
            f"POST /v1/sessions/{sid}/invocations HTTP/1.1\r\n"
            + self.host_line
            + "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
        ).encode("latin-1")
        return True

    def release(self, delay: float = 0.0) -> None:
        """Start this session's turns (in ``delay`` seconds), reconnecting if need be."""
        self.released = True
        if self.wake is not None and not self.wake.done():
            self.wake.set_result(None)  # reconnect: see _keep_connected
        elif delay:
            self.loop.call_later(delay, self.send_turn)
        else:
            self.send_turn()

    def finish(self) -> None:
        """The response is complete: record it, then start the next turn."""
        window = self.window
        done_at = self.now
        self.state = _IDLE
        ok = False
        if self.capture is not None:  # a create (--server-named): no stream to check
            ok = self.created()
        elif self.status != b"200":
            window.error(f"status {self.status.decode('latin-1')}")
        elif self.failed is not None:
            window.error(self.failed)
        elif not self.done or self.chunks != self.expect:
            window.error(f"incomplete stream ({self.chunks} chunks, done={self.done})")
        else:
            ok = True
            if window.start_ns <= done_at < window.end_ns:
                latency = done_at - self.sent
                ttfc = self.first - self.sent
                window.latency.append(latency)
                window.overhead.append(latency - self.think_ns)
                window.ttfc.append(ttfc)
                window.ttfc_overhead.append(ttfc - self.think_ns)
                window.think.append(self.think_ns)
        if ok and not self.primed:
            self.primed = True
            window.primed()
        elif ok:
            window.release()  # one more session per finished turn: see run()
        if self.admitted is not None and not self.admitted.done():
            self.admitted.set_result(None)
        if self.close_after:
            self.close()
        elif ok:
            self.send_turn()
        else:
            self.loop.call_later(0.05, self.send_turn)  # back off after an error

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    @property
    def in_flight_since(self) -> int | None:
        return self.sent if self.state != _IDLE else None


async def _keep_connected(window: _Window, index: int, gate: asyncio.Semaphore) -> None:
    """Connect session ``index`` and prime it; reconnect if lost.

    A connection holds its place in ``gate`` until its priming turn is
    answered: a connect completes in the kernel before the server accepts
    it, so only this bounds the server's accept queue. A primed session
    dropped while it waits to be released (hypercorn closes connections idle
    for 5 s) reconnects when it is released.
    """
    opts = window.opts
    loop = asyncio.get_running_loop()
    session = window.sessions[index]
    while not window.stop:
        session.lost = loop.create_future()
        session.admitted = loop.create_future()
        async with gate:
            try:
                connect = (
                    loop.create_unix_connection(lambda: session, opts.unix)
                    if opts.unix is not None
                    else loop.create_connection(lambda: session, opts.host, opts.port)
                )
                await asyncio.wait_for(connect, opts.connect_timeout)
            except (OSError, TimeoutError) as exc:
                window.error(f"connect: {type(exc).__name__}")
                await asyncio.sleep(0.05)
                continue
            if not session.primed:
                await asyncio.wait([session.admitted], timeout=opts.ramp_timeout)
        await session.lost
        session.lost = None
        if session.primed and not session.released and not window.stop:
            session.wake = loop.create_future()
            await session.wake
            session.wake = None


def _own_rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _rss_kb(pid: int | None) -> int | None:
    """RSS of ``pid`` and its descendants (a supervisor's workers), in KiB."""
    if pid is None:
        return None
    total = _own_rss_kb(pid)
    if total is None:
        return None
    pending, seen = _children(pid), {pid}
    while pending:
        child = pending.pop()
        if child not in seen:
            seen.add(child)
            total += _own_rss_kb(child) or 0
            pending += _children(child)
    return total


async def run(opts: AgentOptions) -> dict[str, Any]:
    """Ramp up ``opts.sessions`` sessions, measure one window; return the result."""
    window = _Window(opts)
    names = read_session_ids(opts.session_ids)
    window.sessions = [
        _Session(window, i, names[i % len(names)] if names else None) for i in range(opts.sessions)
    ]
    rss_before = _rss_kb(opts.server_pid)
    gate = asyncio.Semaphore(opts.connect_concurrency)
    began = time.perf_counter()
    window.tasks = [
        asyncio.create_task(_keep_connected(window, i, gate)) for i in range(opts.sessions)
    ]
    try:
        with contextlib.suppress(TimeoutError):  # measured anyway; see ready_sessions
            await asyncio.wait_for(window.all_ready.wait(), opts.ramp_timeout)
        ramp = time.perf_counter() - began
        ready = window.ready
        went = time.perf_counter()
        window.waiting.extend(window.sessions[_FIRST:])
        if not window.waiting:
            window.all_released.set()
        for session in window.sessions[:_FIRST]:
            # Staggered over [0, think_max]; then one more per finished turn.
            session.release(think_ms(opts.seed, session.index, 0, 0, opts.think_max) / 1000.0)
        with contextlib.suppress(TimeoutError):  # then the rest at once
            await asyncio.wait_for(window.all_released.wait(), opts.ramp_timeout)
        release = time.perf_counter() - went
        released = opts.sessions - len(window.waiting)
        while window.waiting:
            window.release()
        await asyncio.sleep(opts.warmup)
        meter = CpuMeter(opts.server_pid)
        window.start_ns = time.perf_counter_ns()
        window.end_ns = window.start_ns + int(opts.duration * 1e9)
        rss: list[int] = []
        while (left := (window.end_ns - time.perf_counter_ns()) / 1e9) > 0:
            await asyncio.sleep(min(0.25, left))
            kb = _rss_kb(opts.server_pid)
            if kb is not None:
                rss.append(kb)
        cpu = meter.stop()
        now = time.perf_counter_ns()
        in_flight = [s.in_flight_since for s in window.sessions]
        ages = [now - t for t in in_flight if t is not None]
        disconnected = sum(1 for s in window.sessions if s.transport is None)
    finally:
        window.stop = True
        for session in window.sessions:
            session.close()
        for task in window.tasks:
            task.cancel()
        await asyncio.gather(*window.tasks, return_exceptions=True)
    turns = len(window.latency)
    rate = turns / opts.duration
    rss_steady = sorted(rss)[len(rss) // 2] if rss else None
    per_session = (
        None
        if rss_steady is None or rss_before is None
        else round((rss_steady - rss_before) * 1024 / opts.sessions)
    )
    picker = random.Random(opts.seed)
    kept = sorted(picker.sample(range(turns), min(turns, _RESERVOIR)))
    ms = 1e-6
    return {
        "mode": "agent",
        "sessions": opts.sessions,
        "ready_sessions": ready,
        "ramp_seconds": round(ramp, 3),
        "release_seconds": round(release, 3),
        "released_in_time": released,
        "chunks_per_turn": opts.chunks,
        "think_ms": [opts.think_min, opts.think_max],
        "seed": opts.seed,
        "duration": round(opts.duration, 3),
        "warmup": opts.warmup,
        "turns": turns,
        "turns_per_second": round(rate, 1),
        "chunks_per_second": round(rate * opts.chunks, 1),
        "ideal_turns_per_second": round(opts.ideal, 1),
        "ideal_ratio": round(rate / opts.ideal, 4),
        "think_mean_ms": round(opts.mean_think * 1000, 1),
        "think_adjusted_ratio": (
            round(rate * sum(window.think) / turns * 1e-9 / opts.sessions, 4) if turns else 0.0
        ),
        "think_mean_measured_ms": (round(sum(window.think) / turns * ms, 1) if turns else None),
        "latency_ms": latency_stats(window.latency),
        "overhead_ms": latency_stats(window.overhead),
        "ttfc_ms": latency_stats(window.ttfc),
        "ttfc_overhead_ms": latency_stats(window.ttfc_overhead),
        "errors": sum(window.errors.values()),
        "error_kinds": dict(window.errors),
        "ramp_errors": dict(window.ramp_errors),
        "connects": window.connects,
        "in_flight_at_end": len(ages),
        "disconnected_at_end": disconnected,
        "oldest_in_flight_ms": round(max(ages) * ms, 1) if ages else 0.0,
        "server_rss_before_kb": rss_before,
        "server_rss_steady_kb": rss_steady,
        "server_rss_max_kb": max(rss) if rss else None,
        "server_rss_per_session_bytes": per_session,
        **cpu.report(),
        "turn_samples": {
            "fields": ["think_ms", "latency_ms", "ttfc_ms"],
            "rows": [
                [
                    round(window.think[i] * ms),
                    round(window.latency[i] * ms, 3),
                    round(window.ttfc[i] * ms, 3),
                ]
                for i in kept
            ],
        },
    }


def command(opts: AgentOptions) -> list[str]:
    """The command line that runs ``opts`` in a fresh process (harness side)."""
    return generator_command(
        "benchmarks.agentgen",
        opts.host,
        opts.port,
        opts.warmup,
        opts.duration,
        opts.server_pid,
        "--template",
        opts.template,
        "--sessions",
        str(opts.sessions),
        "--chunks",
        str(opts.chunks),
        "--think-min",
        str(opts.think_min),
        "--think-max",
        str(opts.think_max),
        "--seed",
        str(opts.seed),
        "--connect-concurrency",
        str(opts.connect_concurrency),
        "--ramp-timeout",
        str(opts.ramp_timeout),
        *(["--unix", opts.unix] if opts.unix is not None else []),
        *(["--session-ids", opts.session_ids] if opts.session_ids is not None else []),
        *(["--server-named"] if opts.server_named else []),
    )


def _parse(argv: list[str] | None) -> AgentOptions:
    p = argparse.ArgumentParser(prog="python -m benchmarks.agentgen", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--template", default="bench-think", help="template id of the think agent")
    p.add_argument("-n", "--sessions", type=int, default=100, help="concurrent sessions")
    p.add_argument("--chunks", type=int, default=20, help="chunks streamed per turn")
    p.add_argument("--think-min", type=int, default=50, help="shortest think time, ms")
    p.add_argument("--think-max", type=int, default=500, help="longest think time, ms")
    p.add_argument("--seed", type=int, default=1, help="decides every think time")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds after the ramp-up")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    p.add_argument("--server-pid", type=int, help="report this process's CPU and RSS")
    p.add_argument(
        "--connect-concurrency", type=int, default=64, help="connections opening at once"
    )
    p.add_argument(
        "--ramp-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for every session's first turn before measuring anyway",
    )
    p.add_argument("--unix", metavar="PATH", help="connect to this Unix socket instead")
    p.add_argument("--session-ids", metavar="FILE", help="session i uses the session id on line i")
    p.add_argument(
        "--server-named",
        action="store_true",
        help="create each session with POST /v1/sessions, then use its own route",
    )
    a = p.parse_args(argv)
    if a.sessions < 1 or a.chunks < 1 or a.duration <= 0 or a.warmup < 0:
        p.error("need --sessions >= 1, --chunks >= 1, --duration > 0, --warmup >= 0")
    if not 0 <= a.think_min <= a.think_max:
        p.error("need 0 <= --think-min <= --think-max")
    if a.connect_concurrency < 1 or a.ramp_timeout <= 0:
        p.error("need --connect-concurrency >= 1 and --ramp-timeout > 0")
    return AgentOptions(
        host=a.host,
        port=a.port,
        template=a.template,
        sessions=a.sessions,
        chunks=a.chunks,
        think_min=a.think_min,
        think_max=a.think_max,
        seed=a.seed,
        warmup=a.warmup,
        duration=a.duration,
        server_pid=a.server_pid,
        connect_concurrency=a.connect_concurrency,
        ramp_timeout=a.ramp_timeout,
        unix=a.unix,
        session_ids=a.session_ids,
        server_named=a.server_named,
    )


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: print the result as JSON on stdout."""
    opts = _parse(argv)
    limit = raise_fd_limit()
    if limit < opts.sessions + 64:
        print(
            f"error: {opts.sessions} sessions need {opts.sessions + 64} file descriptors; "
            f"the limit is {limit} (ulimit -n)",
            file=sys.stderr,
        )
        return 2
    return print_result(run(opts))


if __name__ == "__main__":
    sys.exit(main())
