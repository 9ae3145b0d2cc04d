"""The think agent's sessions hosted on Ray actors, driven through Ray's own Python API.

Run by the Ray peer's virtual environment (see :mod:`benchmarks.peers`), never
imported by the harness: this is both the hosted agent and its load
generator, a Ray driver process connected to a running Ray head::

    python benchmarks/peers/ray_agent.py --address 127.0.0.1:6379 --sessions 1000 \\
        --warmup 2 --duration 5 --server-pid PID [--actors 1]

What a user would write to host many stateful agent sessions on Ray: ``K``
async actors (``--actors``, default 1), each owning many sessions in a dict
keyed by session id (session ``i`` always goes to actor ``i mod K``: session
affinity), each turn an async generator method (a Ray streaming generator)
that bumps the session's turn count, awaits the turn's think time (the
simulated model call, ``asyncio.sleep``) and yields ``chunks`` small chunks,
each reaching the driver as its own object reference while the method runs.

The driver runs the workload of :mod:`benchmarks.agentgen`, turn for turn:
the same think times (uniform 50-500 ms from the seed, session and turn),
the same priming turn per session (no think time, one chunk: it creates the
session), the same release ramp (64 sessions staggered over the longest think
time, then one more per finished turn), the same window and figures
(turns/s against the ideal, latency - think, first chunk - think, the
server's CPU and RSS: ``--server-pid`` is the Ray head with every process
it started, actors included). What differs: a turn is an actor call over
Ray's RPC (gRPC between core workers), not an HTTP request on a keep-alive
connection with SSE; the driver is the client, with no HTTP server, parser
or connection per session anywhere. One JSON object is printed on stdout,
with the keys agentgen prints.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections import Counter, deque
from typing import Any

import ray

from benchmarks.agentgen import _rss_kb, think_ms
from benchmarks.loadgen import CpuMeter, latency_stats, raise_fd_limit

FIRST = 64
"""Sessions released at once when all are primed; each finished turn releases one more."""
MAX_CHUNKS = 1000
CHUNKS = [f"token {i}" for i in range(MAX_CHUNKS)]


@ray.remote(num_cpus=0)
class SessionHost:
    """Many agent sessions in one async actor, keyed by session id."""

    def __init__(self) -> None:
        self.sessions: dict[str, dict[str, Any]] = {}

    async def turn(self, session_id: str, think: int, chunks: int) -> Any:
        """One turn of ``session_id``: think ``think`` ms, then stream ``chunks`` chunks."""
        state = self.sessions.setdefault(session_id, {})
        state["turns"] = state.get("turns", 0) + 1
        if think > 0:
            await asyncio.sleep(think / 1000.0)  # the model call: a wait, not work
        for chunk in CHUNKS[: min(chunks, MAX_CHUNKS)]:
            yield chunk

    async def reply(self, session_id: str, think: int, chunks: int) -> list[str]:
        """The same turn answered in one reply: the ``chunks`` chunks as one list."""
        state = self.sessions.setdefault(session_id, {})
        state["turns"] = state.get("turns", 0) + 1
        if think > 0:
            await asyncio.sleep(think / 1000.0)
        return CHUNKS[: min(chunks, MAX_CHUNKS)]

    def count(self) -> int:
        """Sessions held."""
        return len(self.sessions)


class Driver:
    """The sessions' loops of turns and what the measured window recorded."""

    def __init__(self, args: argparse.Namespace, hosts: list[Any]) -> None:
        self.args = args
        self.hosts = hosts
        self.start_ns = self.end_ns = 1 << 62
        self.stop = False
        self.latency: list[int] = []
        self.overhead: list[int] = []
        self.ttfc: list[int] = []
        self.ttfc_overhead: list[int] = []
        self.think: list[int] = []
        self.errors: Counter[str] = Counter()
        self.ramp_errors: Counter[str] = Counter()
        self.released = [asyncio.Event() for _ in range(args.sessions)]
        self.waiting: deque[asyncio.Event] = deque()
        self.all_released = asyncio.Event()
        self.in_flight: dict[int, int] = {}
        self.primed = 0
        self.all_primed = asyncio.Event()

    def error(self, kind: str) -> None:
        now = time.perf_counter_ns()
        if self.start_ns <= now < self.end_ns:
            self.errors[kind] += 1
        elif now < self.start_ns:
            self.ramp_errors[kind] += 1

    def release(self) -> None:
        if self.waiting:
            self.waiting.popleft().set()
            if not self.waiting:
                self.all_released.set()

    async def turn(self, index: int, number: int, think: int, chunks: int) -> bool:
        """One turn; record it if it ends in the window. Whether it succeeded."""
        host = self.hosts[index % len(self.hosts)]
        sent = time.perf_counter_ns()
        self.in_flight[index] = sent
        first = 0
        count = 0
        try:
            if self.args.reply:
                count = len(await host.reply.remote(f"agent-{index}", think, chunks))
                first = time.perf_counter_ns()
            else:
                async for ref in host.turn.remote(f"agent-{index}", think, chunks):
                    ray.get(ref)  # ready: the iteration waited for it (cheaper than `await ref`)
                    count += 1
                    if count == 1:
                        first = time.perf_counter_ns()
        except Exception as exc:
            self.error(type(exc).__name__)
            return False
        finally:
            self.in_flight.pop(index, None)
        done = time.perf_counter_ns()
        if count != chunks:
            self.error(f"incomplete stream ({count} chunks)")
            return False
        if number and self.start_ns <= done < self.end_ns:
            latency = done - sent
            think_ns = think * 1_000_000
            self.latency.append(latency)
            self.overhead.append(latency - think_ns)
            self.ttfc.append(first - sent)
            self.ttfc_overhead.append(first - sent - think_ns)
            self.think.append(think_ns)
        return True

    async def session(self, index: int, gate: asyncio.Semaphore) -> None:
        """Prime session ``index`` (at most ``gate`` at once), wait to be released, loop."""
        args = self.args
        async with gate:
            while not await self.turn(index, 0, 0, 1):
                if self.stop:
                    return
                await asyncio.sleep(0.05)
        self.primed += 1
        if self.primed == args.sessions:
            self.all_primed.set()
        await self.released[index].wait()
        number = 0
        while not self.stop:
            number += 1
            think = think_ms(args.seed, index, number, args.think_min, args.think_max)
            if await self.turn(index, number, think, args.chunks):
                self.release()
            else:
                await asyncio.sleep(0.05)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Create the actors, ramp up the sessions, measure one window; the result."""
    hosts = [
        SessionHost.options(max_concurrency=args.sessions + 64).remote() for _ in range(args.actors)
    ]
    await asyncio.gather(*(host.count.remote() for host in hosts))  # the actors are up
    rss_before = _rss_kb(args.server_pid)
    driver = Driver(args, hosts)
    gate = asyncio.Semaphore(args.connect_concurrency)
    began = time.perf_counter()
    tasks = [asyncio.create_task(driver.session(i, gate)) for i in range(args.sessions)]
    try:
        with contextlib.suppress(TimeoutError):  # measured anyway; see ready_sessions
            await asyncio.wait_for(driver.all_primed.wait(), args.ramp_timeout)
        ramp = time.perf_counter() - began
        ready = driver.primed
        went = time.perf_counter()
        loop = asyncio.get_running_loop()
        for index, event in enumerate(driver.released[:FIRST]):
            # Staggered over [0, think_max]; then one more per finished turn.
            loop.call_later(think_ms(args.seed, index, 0, 0, args.think_max) / 1000.0, event.set)
        driver.waiting.extend(driver.released[FIRST:])
        if not driver.waiting:
            driver.all_released.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(driver.all_released.wait(), args.ramp_timeout)
        release = time.perf_counter() - went
        released = args.sessions - len(driver.waiting)
        while driver.waiting:
            driver.release()
        await asyncio.sleep(args.warmup)
        meter = CpuMeter(args.server_pid)
        driver.start_ns = time.perf_counter_ns()
        driver.end_ns = driver.start_ns + int(args.duration * 1e9)
        rss: list[int] = []
        while (left := (driver.end_ns - time.perf_counter_ns()) / 1e9) > 0:
            await asyncio.sleep(min(0.25, left))
            kb = _rss_kb(args.server_pid)
            if kb is not None:
                rss.append(kb)
        cpu = meter.stop()
        now = time.perf_counter_ns()
        ages = [now - t for t in driver.in_flight.values()]
        held = sum(await asyncio.gather(*(host.count.remote() for host in hosts)))
    finally:
        driver.stop = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    turns = len(driver.latency)
    rate = turns / args.duration
    mean_think = (args.think_min + args.think_max) / 2000.0
    ideal = args.sessions / mean_think
    rss_steady = sorted(rss)[len(rss) // 2] if rss else None
    per_session = (
        None
        if rss_steady is None or rss_before is None
        else round((rss_steady - rss_before) * 1024 / args.sessions)
    )
    ms = 1e-6
    return {
        "mode": "ray-actors-reply" if args.reply else "ray-actors-stream",
        "sessions": args.sessions,
        "actors": args.actors,
        "sessions_held": held,
        "ready_sessions": ready,
        "ramp_seconds": round(ramp, 3),
        "release_seconds": round(release, 3),
        "released_in_time": released,
        "chunks_per_turn": args.chunks,
        "think_ms": [args.think_min, args.think_max],
        "seed": args.seed,
        "duration": round(args.duration, 3),
        "warmup": args.warmup,
        "turns": turns,
        "turns_per_second": round(rate, 1),
        "chunks_per_second": round(rate * args.chunks, 1),
        "ideal_turns_per_second": round(ideal, 1),
        "ideal_ratio": round(rate / ideal, 4),
        "think_mean_ms": round(mean_think * 1000, 1),
        "think_adjusted_ratio": (
            round(rate * sum(driver.think) / turns * 1e-9 / args.sessions, 4) if turns else 0.0
        ),
        "think_mean_measured_ms": (round(sum(driver.think) / turns * ms, 1) if turns else None),
        "latency_ms": latency_stats(driver.latency),
        "overhead_ms": latency_stats(driver.overhead),
        "ttfc_ms": latency_stats(driver.ttfc),
        "ttfc_overhead_ms": latency_stats(driver.ttfc_overhead),
        "errors": sum(driver.errors.values()),
        "error_kinds": dict(driver.errors),
        "ramp_errors": dict(driver.ramp_errors),
        "connects": 0,
        "in_flight_at_end": len(ages),
        "disconnected_at_end": 0,
        "oldest_in_flight_ms": round(max(ages) * ms, 1) if ages else 0.0,
        "server_rss_before_kb": rss_before,
        "server_rss_steady_kb": rss_steady,
        "server_rss_max_kb": max(rss) if rss else None,
        "server_rss_per_session_bytes": per_session,
        **cpu.report(),
        "ray_version": ray.__version__,
    }


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--address", required=True, help="the Ray head's GCS address, host:port")
    p.add_argument("-n", "--sessions", type=int, default=100)
    p.add_argument("--actors", type=int, default=1, help="session-hosting actors")
    p.add_argument("--chunks", type=int, default=20)
    p.add_argument("--think-min", type=int, default=50)
    p.add_argument("--think-max", type=int, default=500)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--server-pid", type=int, help="the Ray head: its CPU and RSS, descendants in")
    p.add_argument("--connect-concurrency", type=int, default=64, help="sessions priming at once")
    p.add_argument("--ramp-timeout", type=float, default=60.0)
    p.add_argument(
        "--reply",
        action="store_true",
        help="answer each turn in one reply (a list of the chunks) instead of a stream",
    )
    args = p.parse_args(argv)
    if args.sessions < 1 or args.actors < 1 or args.chunks < 1 or args.duration <= 0:
        p.error("need --sessions, --actors, --chunks >= 1 and --duration > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Connect to the head, run the workload, print the result as JSON."""
    args = _parse(argv)
    raise_fd_limit()
    ray.init(address=args.address, logging_level="WARNING", log_to_driver=False)
    try:
        result = asyncio.run(measure(args))
    finally:
        ray.shutdown()
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
