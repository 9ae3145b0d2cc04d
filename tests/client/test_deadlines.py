"""Deadlines: a call past its timeout raises InvocationTimeoutError promptly."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ppio_sandbox.client import InvocationTimeoutError

from .conftest import client_for, drain, orchestrator

pytestmark = pytest.mark.anyio

SLEEP_5S = {"action": "sleep", "seconds": 5}


async def test_invoke_past_its_timeout_raises_within_a_second(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o, client_for(o) as client:
        started = time.monotonic()
        with pytest.raises(InvocationTimeoutError, match=r"0\.5 s"):
            await client.invoke_agent("echo", SLEEP_5S, timeout=0.5)
        assert time.monotonic() - started < 1.0
        # The one-shot session was closed, which cancelled the agent's work.
        assert o.host.list_sessions("default") == []
        assert o.host.running_turns == 0


async def test_the_configured_timeout_applies_to_session_turns(tmp_path: Path) -> None:
    async with (
        orchestrator(tmp_path) as o,
        client_for(o, timeout=0.4) as client,
        await client.create_session("echo") as session,
    ):
        started = time.monotonic()
        with pytest.raises(InvocationTimeoutError):
            await session.invoke(SLEEP_5S)
        assert time.monotonic() - started < 1.0
        # The server goes on with a turn whose caller gave up: interrupt it. A
        # turn's own timeout wins over the configured one.
        reply = await session.invoke("quick", strategy="interrupt", timeout=10)
        assert reply.result["echo"] == "quick"


async def test_a_stream_past_its_deadline_raises_and_releases_the_session(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o, client_for(o) as client:
        slow = {"action": "stream", "count": 10, "delay": 0.3}
        got: list[object] = []
        started = time.monotonic()
        with pytest.raises(InvocationTimeoutError):
            await drain(client.stream_agent("echo", slow, timeout=0.5), got)
        assert time.monotonic() - started < 1.0
        assert got[:1] == [{"i": 0}]
        assert o.host.list_sessions("default") == []
