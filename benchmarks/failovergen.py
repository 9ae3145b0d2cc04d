"""Failover of a cluster node under load: how long its sessions are away, what they lose.

Run in its own process against two ``serve --cluster`` nodes, the *owner*
(which it will kill) and the *entry* (which survives)::

    python -m benchmarks.failovergen --port ENTRY --owner-port OWNER --kill-pid PID \\
        --template bench-counter --sessions 100 --before 3 --timeout 30

1. Priming: each session ``<prefix><i>`` gets its first turn on the owner
   (``POST /v1/agents/<template>/invocations`` with ``X-PPIO-Session-Id``),
   so the owner claims it; a failed attempt is retried (up to 5 times,
   counted in ``prime_retries`` by kind), and a session never primed is left
   out (``primed``).
2. Load: every session loops over turns, one at a time on its own
   keep-alive connection to the *entry* node, which forwards them to the
   owner. A ``200`` reply is an acknowledged turn; the counter agent
   (``benchmarks/templates/counter``) replies the session's turn count,
   which lives in ``context.state``.
3. After ``--before`` seconds it sends ``SIGKILL`` to ``--kill-pid`` (the
   owner) and notes the time. Every session keeps sending to the entry
   node, retrying every ``--retry`` seconds after a failed turn (``Retry-After``
   is not waited for, to time the recovery finely) until one succeeds: the
   entry node has claimed the session once the owner's lease expired and
   brought it back from its last checkpoint (or, with nothing stored,
   created it afresh).

Per session: the *recovery time* is from the kill to the reply of its first
successful turn sent after the kill; the *lost turns* are the acknowledged
turns the session forgot, ``acked + 1 - counter`` where ``acked`` counts the
``200`` replies to turns sent before the kill (the priming turn included)
and ``counter`` is the turn count in that first reply after it. A turn that
was running when the node died may have been stored without its reply
getting through: ``applied_unacked`` counts those (``counter`` above
``acked + 1``). One JSON object is printed on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .loadgen import generator_command, latency_stats, print_result

__all__ = ["FailoverOptions", "command", "main", "run"]

PRIME_ATTEMPTS = 5
PRIME_BACKOFF = 0.2
"""Seconds before the second priming attempt (then twice, three times as long...)."""


@dataclass
class FailoverOptions:
    """Where to connect, whom to kill, how many sessions, for how long."""

    host: str = "127.0.0.1"
    port: int = 8900
    """The entry node: survives, forwards, then takes the sessions over."""
    owner_port: int = 8901
    """The node the sessions are primed on, then killed."""
    kill_pid: int = 0
    template: str = "bench-counter"
    sessions: int = 100
    before: float = 3.0
    """Seconds of load through the entry node before the kill."""
    retry: float = 0.05
    timeout: float = 60.0
    """Seconds after the kill to wait for every session to come back."""
    session_prefix: str = "failover-"
    io_timeout: float = 30.0
    # Kept for the shared command line (not used).
    warmup: float = 0.0
    duration: float = 0.0
    server_pid: int | None = None


@dataclass
class _State:
    opts: FailoverOptions
    kill_ns: int | None = None
    primed: int = 0
    prime_done: int = 0
    all_primed: asyncio.Event = field(default_factory=asyncio.Event)
    go: asyncio.Event = field(default_factory=asyncio.Event)
    acked: list[int] = field(default_factory=list)
    after: list[int | None] = field(default_factory=list)
    recovery_ns: list[int | None] = field(default_factory=list)
    errors_before: Counter[str] = field(default_factory=Counter)
    prime_retries: Counter[str] = field(default_factory=Counter)
    """Failed priming attempts by kind (retried up to ``PRIME_ATTEMPTS`` times)."""
    outage: Counter[str] = field(default_factory=Counter)
    turns_before: int = 0


def _request(opts: FailoverOptions, sid: str, tag: int, port: int) -> bytes:
    body = b'{"tag":%d}' % tag
    head = (
        f"POST /v1/agents/{opts.template}/invocations HTTP/1.1\r\n"
        f"Host: {opts.host}:{port}\r\n"
        "Content-Type: application/json\r\n"
        f"X-PPIO-Session-Id: {sid}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bytes, bool]:
    """One request, its whole reply: ``(status, body, connection closes)``."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    status = int(head[9:12])
    at = lower.find(b"\r\ncontent-length:")
    if at >= 0:
        size = int(lower[at + 17 : lower.index(b"\r\n", at + 17)])
        body = await reader.readexactly(size) if size else b""
    elif b"\r\ntransfer-encoding: chunked" in lower:
        parts = []
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0], 16)
            if not size:
                break
            parts.append((await reader.readexactly(size + 2))[:-2])
        while await reader.readuntil(b"\r\n") != b"\r\n":
            pass
        body = b"".join(parts)
    else:
        body = b""
    return status, body, b"\r\nconnection: close" in lower


def _turn(body: bytes) -> int:
    return int(json.loads(body)["result"]["turn"])


def _error_kind(status: int, body: bytes) -> str:
    """``status 503 ServiceUnavailableError``: the status and the error envelope's type."""
    try:
        kind = json.loads(body)["error"]["type"]
    except (ValueError, KeyError, TypeError):
        return f"status {status}"
    return f"status {status} {kind}"


async def _open(
    opts: FailoverOptions, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection(opts.host, port), opts.io_timeout)


async def _prime(state: _State, index: int) -> bool:
    """The session's first turn, on the owner (which claims it); retried a few times."""
    for attempt in range(PRIME_ATTEMPTS):
        if attempt:
            await asyncio.sleep(PRIME_BACKOFF * attempt)
        done = await _prime_once(state, index)
        if done is not None:
            return done
    return False


async def _prime_once(state: _State, index: int) -> bool | None:
    """True: primed; False: failed for good; None: failed, worth another try."""
    opts = state.opts
    sid = f"{opts.session_prefix}{index}"
    try:
        reader, writer = await _open(opts, opts.owner_port)
    except (OSError, TimeoutError) as exc:
        state.prime_retries[f"connect: {type(exc).__name__}"] += 1
        return None
    try:
        status, body, _ = await asyncio.wait_for(
            _exchange(reader, writer, _request(opts, sid, 0, opts.owner_port)), opts.io_timeout
        )
    except (OSError, EOFError, ValueError, TimeoutError, asyncio.IncompleteReadError) as exc:
        state.prime_retries[type(exc).__name__] += 1
        return None
    finally:
        writer.close()
    if status != 200:
        state.prime_retries[_error_kind(status, body)] += 1
        return None
    try:
        first = _turn(body)
    except (ValueError, KeyError, TypeError):
        state.errors_before["prime: bad reply"] += 1
        return False
    if first != 1:
        state.errors_before[f"prime: turn {first}, not 1"] += 1
        return False
    state.acked[index] = 1
    return True


async def _session(state: _State, index: int) -> None:
    opts = state.opts
    if await _prime(state, index):
        state.primed += 1
    state.prime_done += 1
    if state.prime_done == opts.sessions:
        state.all_primed.set()
    await state.go.wait()
    if state.acked[index] == 0:
        return  # never primed: not measured
    sid = f"{opts.session_prefix}{index}"
    clock = time.perf_counter_ns
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    tag = 0
    try:
        while True:
            tag += 1
            sent = clock()
            killed = state.kill_ns is not None and sent >= state.kill_ns
            kind: str | None = None
            status = 0
            body = b""
            if conn is None:
                try:
                    conn = await _open(opts, opts.port)
                except (OSError, TimeoutError) as exc:
                    kind = f"connect: {type(exc).__name__}"
            if conn is not None:
                try:
                    status, body, close = await asyncio.wait_for(
                        _exchange(*conn, _request(opts, sid, tag, opts.port)), opts.io_timeout
                    )
                    if close:
                        conn[1].close()
                        conn = None
                except (
                    OSError,
                    EOFError,
                    ValueError,
                    TimeoutError,
                    asyncio.IncompleteReadError,
                ) as exc:
                    kind = type(exc).__name__
                    conn[1].close()
                    conn = None
            done = clock()
            if kind is None and status == 200:
                if not killed:
                    state.acked[index] += 1
                    state.turns_before += 1
                    continue
                assert state.kill_ns is not None
                try:
                    state.after[index] = _turn(body)
                except (ValueError, KeyError, TypeError):
                    kind = "bad reply"
                else:
                    state.recovery_ns[index] = done - state.kill_ns
                    return
            kind = kind or _error_kind(status, body)
            if state.kill_ns is not None and done >= state.kill_ns:  # a turn cut off counts too
                state.outage[kind] += 1
            else:
                state.errors_before[kind] += 1
            await asyncio.sleep(opts.retry)
    finally:
        if conn is not None:
            conn[1].close()


async def run(opts: FailoverOptions) -> dict[str, Any]:
    """Prime, load, kill, wait for every session to come back; the result."""
    state = _State(opts)
    n = opts.sessions
    state.acked = [0] * n
    state.after = [None] * n
    state.recovery_ns = [None] * n
    tasks = [asyncio.create_task(_session(state, i)) for i in range(n)]
    began = time.perf_counter()
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.all_primed.wait(), opts.io_timeout)
        primed_s = time.perf_counter() - began
        state.go.set()
        await asyncio.sleep(opts.before)
        state.kill_ns = time.perf_counter_ns()
        with contextlib.suppress(ProcessLookupError):
            os.kill(opts.kill_pid, signal.SIGKILL)
        _, pending = await asyncio.wait(tasks, timeout=opts.timeout)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    measured = [i for i in range(n) if state.acked[i] > 0]
    recovered = [i for i in measured if state.after[i] is not None]
    lost = []
    extra = []
    for i in recovered:
        after = state.after[i]
        assert after is not None
        expected = state.acked[i] + 1
        lost.append(max(0, expected - after))
        extra.append(max(0, after - expected))
    recovery = [state.recovery_ns[i] or 0 for i in recovered]
    ms = 1e-6
    return {
        "mode": "failover",
        "sessions": n,
        "primed": len(measured),
        "prime_seconds": round(primed_s, 3),
        "before_seconds": opts.before,
        "retry_seconds": opts.retry,
        "turns_before_kill": state.turns_before,
        "turns_before_kill_per_second": round(state.turns_before / opts.before, 1),
        "acked_before_kill": sum(state.acked[i] for i in measured),
        "recovered": len(recovered),
        "unrecovered": len(measured) - len(recovered),
        "still_waiting": len(pending),
        "recovery_ms": latency_stats(recovery),
        "first_recovery_ms": round(min(recovery) * ms, 1) if recovery else None,
        "lost_turns": sum(lost),
        "sessions_losing_turns": sum(1 for x in lost if x),
        "lost_turns_max": max(lost) if lost else 0,
        "lost_turns_mean": round(sum(lost) / len(lost), 3) if lost else 0.0,
        "applied_unacked": sum(extra),
        "errors_before_kill": dict(state.errors_before),
        "prime_retries": dict(state.prime_retries),
        "errors": sum(state.errors_before.values()),
        "outage_replies": dict(state.outage),
        "per_session": {
            "fields": ["acked", "counter_after", "recovery_ms"],
            "rows": [
                [
                    state.acked[i],
                    state.after[i],
                    None if state.recovery_ns[i] is None else round(state.recovery_ns[i] * ms, 1),
                ]
                for i in measured
            ],
        },
    }


def command(opts: FailoverOptions) -> list[str]:
    """The command line that runs ``opts`` in a fresh process (harness side)."""
    return generator_command(
        "benchmarks.failovergen",
        opts.host,
        opts.port,
        opts.warmup,
        opts.duration,
        opts.server_pid,
        "--owner-port",
        str(opts.owner_port),
        "--kill-pid",
        str(opts.kill_pid),
        "--template",
        opts.template,
        "--sessions",
        str(opts.sessions),
        "--before",
        str(opts.before),
        "--retry",
        str(opts.retry),
        "--timeout",
        str(opts.timeout),
        "--session-prefix",
        opts.session_prefix,
    )


def _parse(argv: list[str] | None) -> FailoverOptions:
    p = argparse.ArgumentParser(prog="python -m benchmarks.failovergen", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="the entry node (survives)")
    p.add_argument("--owner-port", type=int, required=True, help="the node to prime and kill")
    p.add_argument("--kill-pid", type=int, required=True, help="the owner node's pid")
    p.add_argument("--template", default="bench-counter")
    p.add_argument("-n", "--sessions", type=int, default=100)
    p.add_argument("--before", type=float, default=3.0, help="seconds of load before the kill")
    p.add_argument("--retry", type=float, default=0.05, help="seconds between retries")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait after the kill")
    p.add_argument("--session-prefix", default="failover-")
    p.add_argument("--warmup", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--duration", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.sessions < 1 or a.before < 0 or a.retry <= 0 or a.timeout <= 0:
        p.error("need --sessions >= 1, --before >= 0, --retry > 0, --timeout > 0")
    return FailoverOptions(
        host=a.host,
        port=a.port,
        owner_port=a.owner_port,
        kill_pid=a.kill_pid,
        template=a.template,
        sessions=a.sessions,
        before=a.before,
        retry=a.retry,
        timeout=a.timeout,
        session_prefix=a.session_prefix,
        warmup=a.warmup,
        duration=a.duration,
        server_pid=a.server_pid,
    )


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: print the result as JSON on stdout."""
    return print_result(run(_parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
