"""Sync entrypoints: run in worker threads, returning values or streaming."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator

import anyio
import pytest

from tests.e2e.helpers import AGENTS, Server, eventually, is_busy, running, sse_events

SYNC = AGENTS / "sync_agents.py"


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Server]]:
    started = {name: Server(SYNC, app=name) for name in ("dict_app", "gen_app", "one_param_app")}
    with running(*started.values()):
        yield started


def test_sync_function_returning_a_dict(servers: dict[str, Server]) -> None:
    with servers["dict_app"].client() as client:
        reply = client.post(
            "/invocations", json={"prompt": "hi"}, headers={"X-PPIO-Session-Id": "sync-1"}
        )

    assert reply.status_code == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.json()["result"] == {"echo": "hi", "session_id": "sync-1", "main_thread": False}


def test_sync_function_with_one_parameter(servers: dict[str, Server]) -> None:
    with servers["one_param_app"].client() as client:
        reply = client.post("/invocations", json={"prompt": "solo", "x": 1})

    assert reply.status_code == 200
    assert reply.json()["result"] == {"keys": ["prompt", "x"], "prompt": "solo"}


@pytest.mark.anyio
async def test_ping_answers_quickly_during_a_blocking_sync_call(
    servers: dict[str, Server],
) -> None:
    server = servers["dict_app"]
    latencies: list[float] = []
    replies: list[dict] = []
    async with server.async_client() as client, server.async_client() as pinger:

        async def slow_call() -> None:
            reply = await client.post("/invocations", json={"prompt": "slow", "sleep": 1.0})
            replies.append(reply.json())

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow_call)
            # Wait (bounded) until the blocking call is running...
            await eventually(lambda: is_busy(pinger), timeout=5)
            # ...then the event loop must still answer at once, more than once.
            for _ in range(3):
                start = time.monotonic()
                reply = await pinger.get("/ping")
                latencies.append(time.monotonic() - start)
                assert reply.json()["status"] == "HealthyBusy"

    assert [r["result"]["echo"] for r in replies] == ["slow"]
    assert max(latencies) < 0.3, latencies


@pytest.mark.anyio
async def test_sync_generator_streams_from_a_worker_thread(servers: dict[str, Server]) -> None:
    async with (
        servers["gen_app"].async_client() as client,
        client.stream("POST", "/invocations", json={"count": 3}) as reply,
    ):
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [event async for event in sse_events(reply.aiter_lines())]

    assert [(e.id, json.loads(e.data)) for e in events[:3]] == [
        (str(n), {"n": n, "main_thread": False}) for n in (1, 2, 3)
    ]
    assert events[3].event == "done"
    assert json.loads(events[3].data)["chunks"] == 3


@pytest.mark.anyio
async def test_blocking_sync_generator_streams_incrementally_and_does_not_block_ping(
    servers: dict[str, Server],
) -> None:
    server = servers["gen_app"]
    arrivals: list[float] = []
    ping_latencies: list[float] = []
    async with server.async_client() as client, server.async_client() as pinger:

        async def ping_while_streaming() -> None:
            while len(arrivals) < 3:
                start = time.monotonic()
                assert (await pinger.get("/ping")).status_code == 200
                ping_latencies.append(time.monotonic() - start)
                await anyio.sleep(0.05)

        start = time.monotonic()
        async with (
            anyio.create_task_group() as tg,
            client.stream("POST", "/invocations", json={"count": 3, "delay": 0.4}) as reply,
        ):
            tg.start_soon(ping_while_streaming)
            async for event in sse_events(reply.aiter_lines()):
                if event.event == "message":
                    arrivals.append(time.monotonic() - start)

    assert len(arrivals) == 3
    assert arrivals[0] < 0.8, arrivals
    assert arrivals[-1] >= 1.2, arrivals
    # A generator blocking the event loop would hold the pings for 0.4 s at a time:
    # a handful would get through in the 1.2 s, and half of them would wait 0.2 s or
    # more. Free, one goes every 0.05 s or so (a loaded machine slows one, not all).
    assert len(ping_latencies) >= 8, ping_latencies
    assert statistics.median(ping_latencies) < 0.1, ping_latencies


def test_root_reports_a_sync_generator_as_streaming(servers: dict[str, Server]) -> None:
    with servers["gen_app"].client() as client:
        info = client.get("/").json()

    assert info["entrypoint"] == "sync_gen"
    assert info["streaming"] is True
