"""Deadlines: a call past its timeout raises InvocationTimeoutError promptly.

"Promptly" is checked against the agent's own pace: the agent would go on for
seconds, so a call that raised before then was cut by its deadline. The
bound is loose on purpose (a slow machine must not fail it); the message,
naming the call's own timeout, says which deadline fired.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ppio_sandbox.client import InvocationTimeoutError

from .conftest import client_for, drain, orchestrator

pytestmark = pytest.mark.anyio

SLEEP_5S = {"action": "sleep", "seconds": 5}
BEFORE_THE_AGENT_ENDS = 4.0
"""Seconds a call may take and still have been cut short: the agent's turns here last 5 s."""


async def test_invoke_past_its_timeout_raises_before_the_turn_ends(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o, client_for(o) as client:
        started = time.monotonic()
        with pytest.raises(InvocationTimeoutError, match=r"0\.5 s"):
            await client.invoke_agent("echo", SLEEP_5S, timeout=0.5)
        assert time.monotonic() - started < BEFORE_THE_AGENT_ENDS
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
        with pytest.raises(InvocationTimeoutError, match=r"within 0\.4 s"):
            await session.invoke(SLEEP_5S)
        assert time.monotonic() - started < BEFORE_THE_AGENT_ENDS
        # The server goes on with a turn whose caller gave up: interrupt it. A
        # turn's own timeout wins over the configured one.
        reply = await session.invoke("quick", strategy="interrupt", timeout=10)
        assert reply.result["echo"] == "quick"


async def test_a_stream_past_its_deadline_raises_and_releases_the_session(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o, client_for(o) as client:
        # The first chunk at once, the second 5 s later: the deadline falls between.
        slow = {"action": "stream", "count": 2, "delay": 5}
        got: list[object] = []
        started = time.monotonic()
        with pytest.raises(InvocationTimeoutError, match=r"within 1 s"):
            await drain(client.stream_agent("echo", slow, timeout=1), got)
        assert time.monotonic() - started < BEFORE_THE_AGENT_ENDS
        assert got == [{"i": 0}]
        assert o.host.list_sessions("default") == []
