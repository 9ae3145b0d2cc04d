"""A client that goes away mid-stream cancels the agent's generator."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from tests.e2e.helpers import AGENTS, Server, eventually, sse_events

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
async def test_disconnect_cancels_a_yield_only_generator(
    spawn: Callable[..., Server], tmp_path: Path, backend: str
) -> None:
    server = spawn(AGENTS / "endless_stream_agent.py", backend=backend)
    marker = tmp_path / "generator-closed"

    async with server.async_client(timeout=5.0) as client:
        async with client.stream("POST", "/invocations", json={"marker": str(marker)}) as reply:
            assert reply.status_code == 200
            seen = []
            async for event in sse_events(reply.aiter_lines()):
                seen.append((event.id, event.data))
                if len(seen) == 3:
                    break
        # Leaving the block closed the connection mid-stream.
        assert seen == [("1", "1"), ("2", "2"), ("3", "3")]

        # The event loop is not starved while the generator is being stopped.
        async with server.async_client(timeout=5.0) as pinger:
            start = time.monotonic()
            ping = await pinger.get("/ping")
            ping_latency = time.monotonic() - start
        assert ping.status_code == 200
        assert ping_latency < 1.0

        async def closed() -> bool:
            return marker.exists()

        await eventually(closed, timeout=5)
    produced = int(marker.read_text())
    assert produced >= 3

    # Nothing keeps running: the process is idle, and still answers.
    cpu_before = server.cpu_seconds()
    await anyio.sleep(1.0)
    cpu_used = server.cpu_seconds() - cpu_before
    assert cpu_used < 0.3, f"server used {cpu_used:.2f} s of CPU in 1 s after the disconnect"
    async with server.async_client(timeout=2.0) as client:
        start = time.monotonic()
        ping = await client.get("/ping")
        assert time.monotonic() - start < 1.0
    assert ping.json()["status"] == "Healthy"  # the cancelled stream no longer counts as busy
    assert int(marker.read_text()) == produced


async def test_disconnect_closes_a_blocking_sync_generator(
    spawn: Callable[..., Server], tmp_path: Path
) -> None:
    server = spawn(AGENTS / "sync_agents.py", app="gen_app")
    marker = tmp_path / "sync-generator-closed"
    # 60 s of chunks: a generator run to the end would write the marker long after
    # the deadlines below, however loaded the machine is.
    body = {"count": 600, "delay": 0.1, "marker": str(marker)}

    async with server.async_client() as client:
        async with client.stream("POST", "/invocations", json=body) as reply:
            lines = reply.aiter_lines()
            assert await anext(lines) == "id: 1"

        async def closed() -> bool:
            return marker.exists()

        await eventually(closed, timeout=15)
        produced = int(marker.read_text())
        assert 1 <= produced < 150  # closed after the disconnect, not run to the end

        # The marker is written before the runtime finishes the request: poll.
        async def idle() -> bool:
            return (await client.get("/ping")).json()["status"] == "Healthy"

        await eventually(idle, timeout=5)
