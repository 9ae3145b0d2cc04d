"""Graceful shutdown: SIGTERM drains in-flight invocations, then the process exits 0."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable

import anyio
import httpx
import pytest

from tests.e2e.helpers import AGENTS, Server, eventually, is_busy

pytestmark = pytest.mark.anyio


async def connection_refused(server: Server) -> bool:
    try:
        async with server.async_client(timeout=1.0) as client:
            await client.get("/ping")
    except httpx.ConnectError:
        return True
    return False


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
async def test_sigterm_lets_the_in_flight_invocation_finish_then_exits_0(
    spawn: Callable[..., Server], backend: str
) -> None:
    server = spawn(AGENTS / "behaviour_agent.py", backend=backend)
    replies: list[httpx.Response] = []

    async with server.async_client() as client, anyio.create_task_group() as tg:

        async def slow() -> None:
            replies.append(
                await client.post(
                    "/invocations",
                    json={"mode": "sleep", "seconds": 1},
                    headers={"X-PPIO-Session-Id": "draining"},
                )
            )

        tg.start_soon(slow)
        async with server.async_client() as pinger:
            await eventually(lambda: is_busy(pinger), timeout=5)
        server.signal(signal.SIGTERM)
        signalled = time.monotonic()

        # New connections are refused while the drain is going on...
        await eventually(lambda: connection_refused(server), timeout=5)

    # ...and the in-flight one still gets its answer.
    assert len(replies) == 1
    assert replies[0].status_code == 200
    assert replies[0].json()["result"] == {"slept": 1.0, "session_id": "draining"}

    returncode = await anyio.to_thread.run_sync(server.proc.wait, 5)
    assert returncode == 0, server.output()
    assert time.monotonic() - signalled < 5
    assert await connection_refused(server)
    assert "SIGTERM received" in server.output()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
async def test_idle_server_exits_0_promptly_on_sigterm(
    spawn: Callable[..., Server], backend: str
) -> None:
    server = spawn(AGENTS / "behaviour_agent.py", backend=backend)

    server.signal(signal.SIGTERM)
    start = time.monotonic()
    returncode = await anyio.to_thread.run_sync(server.proc.wait, 20)

    assert returncode == 0
    # Promptly: nothing to drain, so well before the 30 s graceful timeout (the
    # bound is loose: a busy machine may take seconds to tear an interpreter down).
    assert time.monotonic() - start < 10


@pytest.mark.parametrize(
    "backend",
    [
        "asyncio",
        "trio",
    ],
)
async def test_sigterm_exits_promptly_after_a_sync_call_timed_out(
    spawn: Callable[..., Server], backend: str
) -> None:
    server = spawn(AGENTS / "limits_agent.py", app="sync_app", backend=backend)
    async with server.async_client() as client:
        reply = await client.post("/invocations", json={"sleep": 30})
    assert reply.status_code == 504  # the thread keeps sleeping, abandoned

    server.signal(signal.SIGTERM)
    try:
        returncode = await anyio.to_thread.run_sync(server.proc.wait, 2)
    except subprocess.TimeoutExpired:
        pytest.fail("still running 2 s after SIGTERM with nothing in flight")
    assert returncode == 0


@pytest.mark.parametrize(
    "backend",
    [
        "asyncio",
        "trio",
    ],
)
async def test_second_sigterm_stops_at_once_and_cleanly(
    spawn: Callable[..., Server], backend: str
) -> None:
    server = spawn(AGENTS / "behaviour_agent.py", backend=backend)

    outcomes: list[object] = []

    async with server.async_client() as client, anyio.create_task_group() as tg:

        async def stuck() -> None:
            try:
                reply = await client.post("/invocations", json={"mode": "sleep", "seconds": 30})
            except httpx.HTTPError as exc:
                outcomes.append(type(exc).__name__)
            else:
                outcomes.append(reply.status_code)

        tg.start_soon(stuck)
        async with server.async_client() as pinger:
            await eventually(lambda: is_busy(pinger), timeout=5)
        server.signal(signal.SIGTERM)
        await eventually(lambda: connection_refused(server), timeout=5)  # draining now
        server.signal(signal.SIGTERM)
        start = time.monotonic()
        returncode = await anyio.to_thread.run_sync(server.proc.wait, 5)

    assert time.monotonic() - start < 2
    assert len(outcomes) == 1
    assert outcomes[0] != 200  # cut off by the forced stop: a dropped connection or a 5xx
    assert "second signal" in server.output()
    assert "Traceback" not in server.output(), server.output()
    assert returncode == 0
