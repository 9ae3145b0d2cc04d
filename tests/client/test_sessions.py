"""Sessions: lifetime operations, listing, and closing what the client opened."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from ppio_sandbox.client import SandboxSession, SessionNotFoundError

from .conftest import client_for, orchestrator

pytestmark = pytest.mark.anyio


async def test_pause_resume_timeout_ping_and_refresh(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o, client_for(o) as client:
        session = await client.create_session("echo", timeout_seconds=120, metadata={"user": "u1"})
        assert isinstance(session, SandboxSession)
        assert session.status == "ready"
        assert session.info.timeout_seconds == 120
        assert session.info.metadata == {"user": "u1"}
        assert (await session.ping())["status"] in ("Healthy", "HealthyBusy")
        assert (await session.pause()).status == "paused"
        held: list[object] = []

        async def turn() -> None:
            held.append((await session.invoke("held")).result["echo"])

        async with anyio.create_task_group() as tg:
            tg.start_soon(turn)
            await anyio.sleep(0.1)
            assert held == []  # paused: the turn waits
            assert (await session.resume()).status in ("ready", "busy")
        assert held == ["held"]
        assert (await session.set_timeout(30)).timeout_seconds == 30
        info = await session.refresh()
        assert info.turns["ok"] == 1
        assert await session.get_status() == "ready"
        await session.close()


async def test_list_get_and_close_all_sessions(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o, client_for(o) as client:
        a = await client.create_session("echo")
        b = await client.create_session("echo")
        listed = {s.session_id for s in await client.list_sessions()}
        assert listed == {a.session_id, b.session_id}
        assert await client.get_session(a.session_id) is a  # the client's own object
        await client.close_all_sessions()
        assert await client.list_sessions() == []
        with pytest.raises(SessionNotFoundError):
            await b.invoke("late")


async def test_closing_the_client_closes_the_sessions_it_created(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o:
        async with client_for(o) as client:
            await client.create_session("echo")
            kept = await client.create_session("echo")
            await kept.close()
        assert o.host.list_sessions("default") == []
