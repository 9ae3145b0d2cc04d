"""The client's side of ``client-overhead``, run in its own pinned process.

Prints one JSON object on stdout. Modes:

``throughput``
    ``--concurrency C`` tasks each call ``POST /v1/agents/<template>/invocations``
    in a closed loop with their own session id, for ``--warmup`` then
    ``--duration`` seconds; calls completed in the measured window count.
    ``--kind client`` goes through :class:`AgentRuntimeClient.invoke_agent`;
    ``--kind httpx`` posts the same bytes (body, session id, a fresh
    ``Idempotency-Key`` and request id per call) with a bare
    ``httpx.AsyncClient`` holding the same connection limits.

``pool``
    ``AgentRuntimeClient.pool(template)``: ``--count`` acquire + release
    cycles of a warm, healthy session, once with the health check on every
    acquire and once relying on recent use; per-cycle latency percentiles.

``amplification``
    ``--count`` calls, ``--concurrency`` at a time, through the client
    against a server that answers every request 503: how many HTTP requests
    the client sent per call (an ``httpx`` request hook counts them). The
    retry budget should keep the extra requests at about 10 % of the calls.

Every mode runs on ``--backend asyncio`` (uvloop when installed) or ``trio``
and reports its own CPU use.

    python -m benchmarks.clientgen throughput --url http://127.0.0.1:8900 --kind client
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import resource
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx

from benchmarks.loadgen import latency_stats
from ppio_sandbox.agent_runtime.errors import PPIOAgentRuntimeError
from ppio_sandbox.client import AgentRuntimeClient, ClientConfig

__all__ = ["main"]

BODY = b'{"prompt":"hello"}'


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _latency_summary(latencies: list[float]) -> dict[str, float]:
    """The load generators' summary (ms) of latencies measured in seconds."""
    return latency_stats([round(seconds * 1e9) for seconds in latencies])


def _config(args: argparse.Namespace, **overrides: Any) -> ClientConfig:
    settings: dict[str, Any] = {
        "base_url": args.url,
        "timeout": 30,
        "max_connections": args.concurrency,
        "max_keepalive_connections": args.concurrency,
    }
    settings.update(overrides)
    return ClientConfig(**settings)


async def _closed_loop(
    call: Callable[[int], Awaitable[None]], args: argparse.Namespace
) -> dict[str, Any]:
    """``args.concurrency`` tasks calling ``call(worker)`` until the window ends."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    clock = time.perf_counter
    start = clock() + args.warmup
    end = start + args.duration
    cpu: list[float] = []

    async def worker(index: int) -> None:
        while True:
            began = clock()
            if began >= end:
                return
            try:
                await call(index)
            except (PPIOAgentRuntimeError, httpx.HTTPError) as exc:
                kind = type(exc).__name__
                errors[kind] = errors.get(kind, 0) + 1
                continue
            done = clock()
            if start <= done < end:
                latencies.append(done - began)

    async def cpu_marks() -> None:
        await anyio.sleep(max(0.0, start - clock()))
        cpu.append(_cpu_seconds())
        await anyio.sleep(max(0.0, end - clock()))
        cpu.append(_cpu_seconds())

    async with anyio.create_task_group() as tg:
        tg.start_soon(cpu_marks)
        for index in range(args.concurrency):
            tg.start_soon(worker, index)
    return {
        "calls": len(latencies),
        "rps": round(len(latencies) / args.duration, 1),
        **_latency_summary(latencies),
        "client_cpu_percent": round((cpu[1] - cpu[0]) / args.duration * 100, 1),
        "errors": sum(errors.values()),
        "error_kinds": errors,
    }


async def throughput(args: argparse.Namespace) -> dict[str, Any]:
    """Closed-loop invocations through the client or bare httpx."""
    path = f"/v1/agents/{args.template}/invocations"
    sessions = [f"ovh-{args.kind}-{i}" for i in range(args.concurrency)]
    request = {"prompt": "hello"}
    if args.kind == "client":
        async with AgentRuntimeClient(config=_config(args)) as client:

            async def call(index: int) -> None:
                await client.invoke_agent(args.template, request, session_id=sessions[index])

            return await _closed_loop(call, args)

    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=args.concurrency
    )
    counter = itertools.count()
    prefix = uuid.uuid4().hex[:12]
    async with httpx.AsyncClient(base_url=args.url, limits=limits, timeout=30) as http:

        async def call(index: int) -> None:
            n = next(counter)
            response = await http.post(
                path,
                content=BODY,
                headers={
                    "Content-Type": "application/json",
                    "X-PPIO-Session-Id": sessions[index],
                    "Idempotency-Key": f"{prefix}-{n}",
                    "X-Request-Id": f"{prefix}-r{n}",
                },
            )
            if response.status_code != 200:
                raise httpx.HTTPStatusError(
                    f"status {response.status_code}", request=response.request, response=response
                )

        return await _closed_loop(call, args)


async def amplification(args: argparse.Namespace) -> dict[str, Any]:
    """Calls against an always-503 server: HTTP requests sent per call."""
    sent = 0

    async def count(request: httpx.Request) -> None:
        nonlocal sent
        sent += 1

    failed: dict[str, int] = {}
    limiter = anyio.Semaphore(args.concurrency)
    config = _config(args, max_retries=args.max_retries, retry_backoff=0.001)
    started = time.perf_counter()
    async with AgentRuntimeClient(config=config) as client:
        client.http_client.event_hooks["request"].append(count)

        async def one(n: int) -> None:
            async with limiter:
                try:
                    await client.invoke_agent(args.template, "hello", session_id=f"amp-{n}")
                except PPIOAgentRuntimeError as exc:
                    kind = type(exc).__name__
                    failed[kind] = failed.get(kind, 0) + 1

        async with anyio.create_task_group() as tg:
            for n in range(args.count):
                tg.start_soon(one, n)
    elapsed = time.perf_counter() - started
    # A one-shot call also sends a DELETE for its session; none here (session_id given).
    return {
        "calls": args.count,
        "requests": sent,
        "extra_requests": sent - args.count,
        "amplification_percent": round((sent - args.count) / args.count * 100, 2),
        "failures": failed,
        "seconds": round(elapsed, 3),
    }


async def pool(args: argparse.Namespace) -> dict[str, Any]:
    """Acquire + release cycles of a warm pooled session, with and without a health check."""
    out: dict[str, Any] = {}
    async with AgentRuntimeClient(config=_config(args)) as client:
        for label, check_every in (("checked", 0.0), ("recent", 3600.0)):
            async with client.pool(
                args.template, min_idle=1, max_size=2, check_interval=check_every
            ) as sessions:
                async with sessions.acquire() as session:
                    await session.invoke({"prompt": "warm"})
                latencies: list[float] = []
                clock = time.perf_counter
                cpu0 = _cpu_seconds()
                for _ in range(args.count):
                    began = clock()
                    async with sessions.acquire():
                        pass
                    latencies.append(clock() - began)
                cpu = _cpu_seconds() - cpu0
            out[label] = {
                "cycles": len(latencies),
                **_latency_summary(latencies),
                "cpu_us_per_cycle": round(cpu / len(latencies) * 1e6, 1),
            }
    return out


MODES: dict[str, Callable[[argparse.Namespace], Awaitable[dict[str, Any]]]] = {
    "throughput": throughput,
    "amplification": amplification,
    "pool": pool,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.clientgen", description=__doc__)
    parser.add_argument("mode", choices=sorted(MODES))
    parser.add_argument("--url", required=True, help="the orchestrator, http://127.0.0.1:PORT")
    parser.add_argument("--template", default="bench-hello")
    parser.add_argument("--kind", choices=["client", "httpx"], default="client")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--max-retries", type=int, default=3)
    args = parser.parse_args(argv)
    options: dict[str, Any] = {}
    if args.backend == "asyncio" and importlib.util.find_spec("uvloop") is not None:
        options["use_uvloop"] = True
    result = anyio.run(MODES[args.mode], args, backend=args.backend, backend_options=options)
    result.update(mode=args.mode, kind=args.kind, backend=args.backend)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
