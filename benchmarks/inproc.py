"""In-process probes: each runs in a fresh process and prints one JSON object.

The harness starts one per measurement (``procs.run_json``) so that memory
and warm-up never leak from one measurement into the next::

    python -m benchmarks.inproc churn --backend asyncio --subject orchestrator \
        --count 20000 --cycles 5000 --workdir /tmp/x
    python -m benchmarks.inproc idle --backend trio --subject anyio-task --count 100000
    python -m benchmarks.inproc sandbox --subject warm --count 20 --workdir /tmp/x

``churn``: session creations per second through the orchestrator's host
object (``Orchestrator.create_session``, no HTTP), then create + first turn
+ close cycles per second; the ``anyio-task`` subject spawns a bare task
with its own memory object stream per "session" instead.

``idle``: RSS per idle session. ``gc.collect()``, RSS from
``/proc/self/statm``, create ``count`` sessions (``orchestrator``: fresh;
``orchestrator-used``: each ran one turn as the front door runs it, inline for
an idle session, and any actor it started passivated;
``anyio-task``: a task waiting on its own stream), ``gc.collect()``, RSS
again; the delta over ``count``. With ``--heap``, ``tracemalloc`` traces the
creation instead: live and peak Python heap bytes per session (tracing
itself inflates RSS, so it is a separate run). ``--passivate-after S``
shortens the actors' quiet period before passivation (default: the
orchestrator's ``PASSIVATE_AFTER``), so that ``orchestrator-used`` waits
less for its actors to passivate.

``asgi``: the orchestrator's ASGI application (its front door, hot path,
session actors and the in-process hello agent) called directly by
``--connections`` tasks in closed loops for ``--count`` requests, no HTTP
server or socket; the ``hello`` subject calls the raw-ASGI hello world
(``benchmarks/hello_asgi.py``) the same way. Gives the application's own
cost per request; ``--profile FILE`` writes a cProfile of the measured part::

    python -m benchmarks.inproc asgi --subject orchestrator --count 50000 --profile o.pstats

``sandbox``: process sandbox creation latency: ``warm`` (provider with a
warm pool of 2, every pooled process answering ``/ping`` before each
create), ``cold`` (no pool), or ``python`` (``subprocess.run([python, "-c",
"pass"])``, the floor of starting any Python process).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from .servers import HELLO_PROCESS_TEMPLATE, HELLO_TEMPLATE

__all__ = ["main", "percentile_ms", "rss_bytes"]


PAYLOAD = {"query": "hello"}
WARM_POOL = 2
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


def percentile_ms(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of ascending seconds, in ms."""
    if not ordered:
        return 0.0
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1e3


def _orchestrator(module: str) -> Any:
    """``ppio_sandbox.orchestrator.<module>``, imported only by the probes that use it.

    (By name: the editable install maps the package at run time, which mypy
    cannot follow from ``benchmarks/``.)
    """
    return importlib.import_module(f"ppio_sandbox.orchestrator.{module}")


# --- churn -------------------------------------------------------------------------------


async def _open_host(workdir: Path) -> tuple[Any, str]:
    """Not a context manager: the caller enters the returned host."""
    host = _orchestrator("host")
    data = Path(tempfile.mkdtemp(prefix="orchestrator-", dir=workdir))
    return host.Orchestrator(host.OrchestratorConfig(data_dir=data)), str(data)


async def _turn(host: Any, session: Any, index: int) -> None:
    """One turn the way the front door runs it: inline in this task when the session is
    idle (no actor task is started), else handed to the session's actor."""
    wait_started = _orchestrator("actor").wait_started
    run = _orchestrator("session_core").Admission.RUN
    admission, turn = host.submit(
        session, PAYLOAD, key=f"k{index}", body_hash=b"", request_id=f"r{index}", inline=True
    )
    if admission is run:
        await host.run_inline(session, turn)
    await wait_started(turn)
    if turn.error is not None:
        raise RuntimeError(f"turn failed: {turn.error!r}")


async def churn_orchestrator(count: int, cycles: int, workdir: Path) -> dict[str, Any]:
    """Creations/s, closes/s and create+turn+close cycles/s through the host object."""
    tenant = _orchestrator("host").SHARED_TENANT
    host, _ = await _open_host(workdir)
    async with host:
        template = await host.register_directory(HELLO_TEMPLATE, tenant)
        tid = template.id
        for i in range(200):  # warm-up: provider, module, code paths
            session = await host.create_session(tenant, tid)
            await _turn(host, session, i)
            await host.close_session(session)
        gc.collect()
        sessions = []
        t0 = time.perf_counter()
        for _ in range(count):
            sessions.append(await host.create_session(tenant, tid))
        t1 = time.perf_counter()
        for session in sessions:
            await host.close_session(session)
        t2 = time.perf_counter()
        sessions.clear()
        gc.collect()
        t3 = time.perf_counter()
        for i in range(cycles):
            session = await host.create_session(tenant, tid)
            await _turn(host, session, i)
            await host.close_session(session)
        t4 = time.perf_counter()
    return {
        "creations_per_s": count / (t1 - t0),
        "closes_per_s": count / (t2 - t1),
        "cycles_per_s": cycles / (t4 - t3),
        "create_us": (t1 - t0) / count * 1e6,
        "cycle_us": (t4 - t3) / cycles * 1e6,
    }


async def churn_tasks(count: int, cycles: int, workdir: Path) -> dict[str, Any]:
    """The baseline: a bare task with its own memory object stream per session."""
    started = 0
    all_started = anyio.Event()

    async def actor(receive: anyio.abc.ObjectReceiveStream[list[Any]]) -> None:
        nonlocal started
        started += 1
        if started == count:
            all_started.set()
        async with receive:
            async for message in receive:
                message[2] = {"ok": True}
                message[1].set()

    async def cycle_actor(receive: anyio.abc.ObjectReceiveStream[list[Any]]) -> None:
        async with receive:
            async for message in receive:
                message[2] = {"ok": True}
                message[1].set()

    async with anyio.create_task_group() as tg:
        sends = []
        t0 = time.perf_counter()
        for _ in range(count):
            send, receive = anyio.create_memory_object_stream[list[Any]](64)
            tg.start_soon(actor, receive)
            sends.append(send)
        await all_started.wait()
        t1 = time.perf_counter()
        for send in sends:
            send.close()
        t2 = time.perf_counter()
        sends.clear()
    gc.collect()
    async with anyio.create_task_group() as tg:
        t3 = time.perf_counter()
        for _ in range(cycles):
            send, receive = anyio.create_memory_object_stream[list[Any]](64)
            tg.start_soon(cycle_actor, receive)
            message: list[Any] = [PAYLOAD, anyio.Event(), None]
            await send.send(message)
            await message[1].wait()
            send.close()
        t4 = time.perf_counter()
    return {
        "creations_per_s": count / (t1 - t0),
        "closes_per_s": count / (t2 - t1),
        "cycles_per_s": cycles / (t4 - t3),
        "create_us": (t1 - t0) / count * 1e6,
        "cycle_us": (t4 - t3) / cycles * 1e6,
    }


# --- idle sessions -----------------------------------------------------------------------


class _Snapshot:
    """RSS, allocated blocks and (with ``heap``) traced heap at one moment."""

    def __init__(self, heap: bool) -> None:
        gc.collect()
        self.time = time.perf_counter()
        self.rss = rss_bytes()
        self.blocks = sys.getallocatedblocks()
        self.heap = self.heap_peak = 0
        if heap:
            if tracemalloc.is_tracing():
                self.heap, self.heap_peak = tracemalloc.get_traced_memory()
            else:
                tracemalloc.start()


def _idle_result(count: int, before: _Snapshot, after: _Snapshot, heap: bool) -> dict[str, Any]:
    result: dict[str, Any] = {
        "count": count,
        "rss_before": before.rss,
        "rss_after": after.rss,
        "bytes_per_session": (after.rss - before.rss) / count,
        "blocks_per_session": (after.blocks - before.blocks) / count,
        "seconds": round(after.time - before.time, 3),
    }
    if heap:
        result["heap_bytes_per_session"] = after.heap / count
        result["heap_peak_bytes_per_session"] = after.heap_peak / count
    return result


def _start_timeout(count: int) -> float:
    """Seconds allowed to create ``count`` sessions (1,000,000 tasks take minutes)."""
    return max(120.0, count / 2_000)


async def idle_orchestrator(count: int, workdir: Path, *, used: bool, heap: bool) -> dict[str, Any]:
    """RSS per idle session: fresh, or after one turn once no actor is left."""
    passivate_after = _orchestrator("actor").PASSIVATE_AFTER
    tenant = _orchestrator("host").SHARED_TENANT

    host, _ = await _open_host(workdir)
    async with host:
        template = await host.register_directory(HELLO_TEMPLATE, tenant)
        tid = template.id
        for i in range(100):  # warm-up, then closed: only the measured sessions stay
            session = await host.create_session(tenant, tid)
            await _turn(host, session, i)
            await host.close_session(session)
        await _quiesce(host)
        before = _Snapshot(heap)
        for i in range(count):
            session = await host.create_session(tenant, tid)
            if used:
                await _turn(host, session, i)
        if used:
            with anyio.fail_after(passivate_after + _start_timeout(count)):
                await _quiesce(host)
        after = _Snapshot(heap)
        live = len(host.directory)
        active = sum(1 for s in host.directory if s.active)
        result = _idle_result(count, before, after, heap)
        result.update(live_sessions=live, active_actors=active)
        _emit_and_exit(result)  # skips closing 100k sessions: this process is done
    raise AssertionError("unreachable")


async def _quiesce(host: Any) -> None:
    """Wait until no session has an actor task (all passivated)."""
    # Polling (bounded by the caller): the host exposes no "all passive" event.
    while any(session.active for session in host.directory):  # noqa: ASYNC110
        await anyio.sleep(0.25)


async def idle_tasks(count: int, workdir: Path, *, used: bool, heap: bool) -> dict[str, Any]:
    """The baseline: ``count`` tasks each waiting on its own memory object stream."""
    started = 0
    all_started = anyio.Event()

    async def actor(receive: anyio.abc.ObjectReceiveStream[Any]) -> None:
        nonlocal started
        started += 1
        if started == count:
            all_started.set()
        async with receive:
            async for _ in receive:
                pass

    async with anyio.create_task_group() as tg:
        before = _Snapshot(heap)
        sends = []
        for _ in range(count):
            send, receive = anyio.create_memory_object_stream[Any](64)
            tg.start_soon(actor, receive)
            sends.append(send)
        with anyio.fail_after(_start_timeout(count)):
            await all_started.wait()
        _emit_and_exit(_idle_result(count, before, _Snapshot(heap), heap))
    raise AssertionError("unreachable")


def _emit_and_exit(result: dict[str, Any]) -> None:
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    os._exit(0)


# --- the ASGI application alone ----------------------------------------------------------

_ASGI_PATH = b"/v1/agents/bench-hello/invocations"
_ASGI_BODY = b'{"query":"hello"}'


async def _orchestrator_app(workdir: Path, stack: Any) -> Any:
    """The front door ``ppio-sandbox-cli serve`` builds (auth off, metrics on)."""
    host_module = _orchestrator("host")
    host, _ = await _open_host(workdir)
    host.metrics = _orchestrator("metrics").OrchestratorMetrics()
    await stack.enter_async_context(host)
    await host.register_directory(HELLO_TEMPLATE, host_module.SHARED_TENANT)
    auth = _orchestrator("auth")
    if _backend() == "trio":
        app_class = importlib.import_module("quart_trio").QuartTrio
    else:
        app_class = importlib.import_module("quart").Quart
    api = _orchestrator("api").create_api(host, app_class)
    return _orchestrator("frontend").FrontDoor(
        host, api, auth.Authenticator(auth.KeyRing()), metrics=host.metrics
    )


def _backend() -> str:
    import sniffio

    return sniffio.current_async_library()


async def asgi_requests(
    subject: str, count: int, connections: int, workdir: Path, profile: Path | None
) -> dict[str, Any]:
    """Requests per second of the ASGI application alone (see the module docstring)."""
    import contextlib

    async with contextlib.AsyncExitStack() as stack:
        if subject == "orchestrator":
            app = await _orchestrator_app(workdir, stack)
        elif subject == "hello":
            app = importlib.import_module("benchmarks.hello_asgi").app
        else:
            raise SystemExit(f"unknown asgi subject {subject!r}")
        statuses: dict[int, int] = {}
        request = {"type": "http.request", "body": _ASGI_BODY, "more_body": False}

        async def receive() -> dict[str, Any]:
            return request

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses[message["status"]] = statuses.get(message["status"], 0) + 1

        def scope(index: int) -> dict[str, Any]:
            return {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": _ASGI_PATH.decode(),
                "raw_path": _ASGI_PATH,
                "query_string": b"",
                "root_path": "",
                "headers": [
                    (b"host", b"127.0.0.1:8900"),
                    (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(_ASGI_BODY)),
                    (b"x-ppio-session-id", b"bench-%d" % index),
                ],
                "client": ("127.0.0.1", 40000 + index),
                "server": ("127.0.0.1", 8900),
            }

        remaining = count

        async def client(index: int) -> None:
            nonlocal remaining
            s = scope(index)
            while remaining > 0:
                remaining -= 1
                await app(dict(s), receive, send)

        async def run(n: int) -> float:
            nonlocal remaining
            remaining = n
            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for i in range(connections):
                    tg.start_soon(client, i)
            return time.perf_counter() - t0

        await run(min(count, 5000))  # warm-up: sessions created, caches filled
        statuses.clear()
        profiler = None
        if profile is not None:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        elapsed = await run(count)
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(str(profile))
    return {
        "subject": subject,
        "requests": count,
        "connections": connections,
        "requests_per_s": count / elapsed,
        "us_per_request": elapsed / count * 1e6,
        "statuses": statuses,
        "profiled": profile is not None,
    }


# --- process sandboxes ---------------------------------------------------------------------


async def _answers_ping(socket_path: str) -> bool:
    try:
        with anyio.fail_after(2):
            async with await anyio.connect_unix(socket_path) as stream:
                await stream.send(
                    b"GET /ping HTTP/1.1\r\nHost: sandbox\r\nConnection: close\r\n\r\n"
                )
                data = b""
                while b"\r\n" not in data:
                    data += await stream.receive()
    except (OSError, TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError):
        return False
    return data.startswith(b"HTTP/1.1 200")


async def _pool_ready(provider: Any, size: int, timeout: float) -> None:
    """Wait until ``size`` pooled processes answer ``/ping`` on a connection of our own."""
    with anyio.fail_after(timeout):
        while True:
            pooled = provider.pooled
            if len(pooled) >= size:
                sockets = [sandbox.describe()["socket"] for sandbox in pooled]
                if all([s and await anyio.Path(s).exists() for s in sockets]):
                    answers = [await _answers_ping(s) for s in sockets]
                    if all(answers):
                        return
            await anyio.sleep(0.01)


def python_start(count: int) -> dict[str, Any]:
    """The floor: ``subprocess.run([python, "-c", "pass"])``, no event loop involved."""
    seconds: list[float] = []
    for _ in range(count + 2):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        seconds.append(time.perf_counter() - t0)
    return _latencies("python", seconds[2:], {})  # the first runs warm the page cache


async def sandbox_create(subject: str, count: int, workdir: Path) -> dict[str, Any]:
    """Creation latency of process sandboxes (see the module docstring)."""
    provider_class = _orchestrator("sandbox.process").ProcessSandboxProvider

    seconds: list[float] = []
    extra: dict[str, Any] = {}
    warm = WARM_POOL if subject == "warm" else 0
    provider = provider_class(
        HELLO_PROCESS_TEMPLATE,
        "agent.py",
        work_root=Path(tempfile.mkdtemp(prefix="sandboxes-", dir=workdir)),
        warm_pool=warm,
    )
    ready_waits: list[float] = []
    async with provider:
        for i in range(count + 1):
            if warm:
                w0 = time.perf_counter()
                await _pool_ready(provider, warm, 60)
                ready_waits.append(time.perf_counter() - w0)
            t0 = time.perf_counter()
            sandbox = await provider.create(f"bench-{i}")
            elapsed = time.perf_counter() - t0
            try:
                await sandbox.ping()
            finally:
                await sandbox.close()
            if i:  # the first create also pays one-time set-up (import root, ...)
                seconds.append(elapsed)
    if ready_waits:
        extra["pool_ready_wait_ms_median"] = sorted(ready_waits)[len(ready_waits) // 2] * 1e3
    return _latencies(subject, seconds, extra)


def _latencies(subject: str, seconds: list[float], extra: dict[str, Any]) -> dict[str, Any]:
    ordered = sorted(seconds)
    return {
        "subject": subject,
        "count": len(ordered),
        "p50_ms": percentile_ms(ordered, 0.5),
        "p99_ms": percentile_ms(ordered, 0.99),
        "max_ms": percentile_ms(ordered, 1.0),
        "mean_ms": sum(ordered) / len(ordered) * 1e3,
        "samples_ms": [round(s * 1e3, 3) for s in seconds],
        **extra,
    }


# --- command line --------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.inproc", description=__doc__)
    p.add_argument("probe", choices=["churn", "idle", "sandbox", "asgi"])
    p.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    p.add_argument("--subject", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--cycles", type=int, default=1000, help="churn: create+turn+close cycles")
    p.add_argument("--connections", type=int, default=64, help="asgi: concurrent clients")
    p.add_argument("--profile", type=Path, help="asgi: write a cProfile of the measured part")
    p.add_argument("--heap", action="store_true", help="idle: trace the heap (tracemalloc)")
    p.add_argument(
        "--passivate-after",
        type=float,
        metavar="S",
        help="idle: actors passivate after S quiet seconds (default: the orchestrator's)",
    )
    p.add_argument("--workdir", type=Path, default=None, help="where data directories go")
    return p.parse_args(argv)


def _probe(args: argparse.Namespace, workdir: Path) -> Callable[[], Awaitable[dict[str, Any]]]:
    count, subject = args.count, args.subject
    if args.probe == "churn":
        churn = {"orchestrator": churn_orchestrator, "anyio-task": churn_tasks}[subject]
        return lambda: churn(count, args.cycles, workdir)
    if args.probe == "asgi":
        return lambda: asgi_requests(subject, count, args.connections, workdir, args.profile)
    if args.probe == "idle":
        idle = {
            "orchestrator": idle_orchestrator,
            "orchestrator-used": idle_orchestrator,
            "anyio-task": idle_tasks,
        }[subject]
        used = subject == "orchestrator-used"
        return lambda: idle(count, workdir, used=used, heap=args.heap)
    if subject not in ("warm", "cold"):
        raise SystemExit(f"unknown sandbox subject {subject!r}")
    return lambda: sandbox_create(subject, count, workdir)


def main(argv: list[str] | None = None) -> int:
    """Run one probe; print its result as JSON on stdout."""
    args = _parse(argv)
    if args.probe == "sandbox" and args.subject == "python":
        json.dump(python_start(args.count), sys.stdout)
        sys.stdout.write("\n")
        return 0
    if args.passivate_after is not None:
        _orchestrator("actor").PASSIVATE_AFTER = args.passivate_after
    with tempfile.TemporaryDirectory(prefix="inproc-", dir=args.workdir) as tmp:
        probe = _probe(args, Path(tmp))
        options: dict[str, Any] = {}
        if args.backend == "asyncio":
            try:
                import uvloop  # noqa: F401
            except ImportError:
                pass
            else:
                options["use_uvloop"] = True
        result = anyio.run(probe, backend=args.backend, backend_options=options)
    result.update(backend=args.backend, probe=args.probe)
    if args.passivate_after is not None:
        result["passivate_after"] = args.passivate_after
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
