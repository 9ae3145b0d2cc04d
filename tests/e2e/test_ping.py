"""/ping: custom handlers, and HealthyBusy while work is running."""

from __future__ import annotations

import time
from collections.abc import Iterator

import anyio
import httpx
import pytest

from tests.e2e.helpers import AGENTS, Server, eventually, running

PINGS = AGENTS / "ping_agents.py"


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Server]]:
    """The three apps of ping_agents.py and the behaviour agent, booted in parallel."""
    started = {
        "busy": Server(PINGS, app="busy_app"),
        "string": Server(PINGS, app="string_app"),
        "raising": Server(PINGS, app="raising_app"),
        "plain": Server(AGENTS / "behaviour_agent.py"),
    }
    with running(*started.values()):
        yield started


def ping(server: Server) -> dict:
    with server.client(timeout=5.0) as client:
        reply = client.get("/ping")
    assert reply.status_code == 200
    return dict(reply.json())


async def wait_for_status(client: httpx.AsyncClient, status: str, timeout: float = 5.0) -> dict:
    """Poll /ping until it reports ``status`` (bounded); return that /ping body."""
    seen: dict = {}

    async def reached() -> bool:
        seen.update((await client.get("/ping")).json())
        return seen["status"] == status

    await eventually(reached, timeout=timeout)
    return seen


def test_handler_returning_healthy_busy_is_reported(servers: dict[str, Server]) -> None:
    body = ping(servers["busy"])

    assert body["status"] == "HealthyBusy"
    assert type(body["time_of_last_update"]) is int


def test_handler_returning_plain_string_healthy_is_normalised(
    servers: dict[str, Server],
) -> None:
    body = ping(servers["string"])

    assert body["status"] == "Healthy"
    assert set(body) == {"status", "time_of_last_update"}


def test_raising_handler_still_answers_200_healthy(servers: dict[str, Server]) -> None:
    body = ping(servers["raising"])

    assert body["status"] == "Healthy"
    assert set(body) == {"status", "time_of_last_update"}
    assert servers["raising"].proc.poll() is None


def test_head_ping_answers_without_a_body(servers: dict[str, Server]) -> None:
    with servers["plain"].client() as client:
        reply = client.head("/ping")

    assert reply.status_code == 200
    assert reply.content == b""


@pytest.mark.anyio
@pytest.mark.parametrize("which", ["plain", "string"])
async def test_healthy_busy_while_an_invocation_runs(
    servers: dict[str, Server], which: str
) -> None:
    """Automatic; the "string" agent's handler says healthy, which does not override busy."""
    server = servers[which]
    body = {"sleep": 0.6} if which == "string" else {"mode": "sleep", "seconds": 0.6}
    async with server.async_client() as client:
        assert (await client.get("/ping")).json()["status"] == "Healthy"
        statuses: list[int] = []

        async def slow() -> None:
            statuses.append((await client.post("/invocations", json=body)).status_code)

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow)
            busy = await wait_for_status(client, "HealthyBusy")
            assert abs(busy["time_of_last_update"] - time.time()) <= 2
        assert statuses == [200]
        healthy = await wait_for_status(client, "Healthy", timeout=2.0)
        assert healthy["time_of_last_update"] >= busy["time_of_last_update"]


@pytest.mark.anyio
async def test_healthy_busy_while_an_async_task_runs(servers: dict[str, Server]) -> None:
    server = servers["plain"]
    async with server.async_client() as client:
        reply = await client.post("/invocations", json={"mode": "background", "seconds": 0.6})
        # The invocation is over; only the tracked background task is running.
        assert reply.json()["result"] == {"started": True}
        first = (await client.get("/ping")).json()
        assert first["status"] == "HealthyBusy"
        start = time.monotonic()
        await wait_for_status(client, "Healthy", timeout=3.0)
        assert time.monotonic() - start >= 0.3  # not before the task could have ended
