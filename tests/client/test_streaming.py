"""Streams: chunks arrive live, from one-shot calls and from sessions."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ppio_sandbox.client import InvocationStream

from .conftest import client_for, orchestrator

pytestmark = pytest.mark.anyio

STREAM = {"action": "stream", "count": 4, "delay": 0.15}


async def test_stream_agent_yields_chunks_as_they_are_produced(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o, client_for(o) as client:
        started = time.monotonic()
        arrivals: list[float] = []
        chunks = []
        async for chunk in client.stream_agent("echo", STREAM):
            arrivals.append(time.monotonic() - started)
            chunks.append(chunk)
        ended = time.monotonic() - started
        assert chunks == [{"i": i} for i in range(4)]
        assert ended >= 0.45  # the agent sleeps between chunks...
        assert arrivals[0] < ended - 0.3  # ...and the first arrived long before the end
        assert o.host.list_sessions("default") == []  # the one-shot session is closed


async def test_session_stream_keeps_state_and_reports_its_end(tmp_path: Path) -> None:
    async with (
        orchestrator(tmp_path) as o,
        client_for(o) as client,
        await client.create_session("echo") as session,
    ):
        await session.invoke("warm up")
        stream = session.stream({"action": "stream", "count": 3})
        async with stream:
            got = [chunk async for chunk in stream]
        assert got == [{"i": 0}, {"i": 1}, {"i": 2}]
        assert stream.last_event_id == "3"
        assert stream.resumes == 0  # an unbroken stream is never resumed
        assert stream.summary is not None
        assert stream.summary["chunks"] == 3
        assert stream.session_id == session.session_id
        state = (await session.invoke({"action": "state"})).result["state"]
        assert state["turns"] == 3
        assert state["stream_closed"] == 1


async def test_invoke_with_stream_true_returns_an_open_stream(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o, client_for(o) as client:
        stream = await client.invoke_agent("echo", STREAM, stream=True)
        assert isinstance(stream, InvocationStream)
        assert stream.content_type.startswith("text/event-stream")
        first = await stream.__anext__()
        assert first == {"i": 0}
        await stream.aclose()  # leaving early: the one-shot session goes too
        assert o.host.list_sessions("default") == []

        async with await client.create_session("echo") as session:
            chunks = await session.invoke({"action": "stream", "count": 2}, stream=True)
            assert [c async for c in chunks] == [{"i": 0}, {"i": 1}]


async def test_a_plain_invoke_collects_a_streaming_agent_into_a_list(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o, client_for(o) as client:
        response = await client.invoke_agent("echo", {"action": "stream", "count": 3})
        assert response.result == [{"i": 0}, {"i": 1}, {"i": 2}]
        assert response.metadata["chunks"] == 3


async def test_a_stream_of_a_non_streaming_agent_yields_its_result_once(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o, client_for(o) as client:
        chunks = [c async for c in client.stream_agent("echo", "not streamed")]
        assert len(chunks) == 1
        assert chunks[0]["echo"] == "not streamed"
