"""Streaming replies: Server-Sent Events written as the agent produces them."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.e2e.helpers import AGENTS, EXAMPLES, Server, SSEEvent, running, sse_events

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def example_server() -> Iterator[Server]:
    """examples/agent_runtime/streaming_agent.py (asyncio.sleep: asyncio only)."""
    with running(Server(EXAMPLES / "streaming_agent.py")) as (server,):
        yield server


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def anyio_server(request: pytest.FixtureRequest) -> Iterator[Server]:
    """The anyio streaming test agent, served on each backend."""
    server = Server(AGENTS / "anyio_streaming_agent.py", backend=request.param)
    with running(server):
        yield server


async def collect(server: Server, body: dict, **headers: str) -> tuple[list[SSEEvent], dict]:
    async with (
        server.async_client() as client,
        client.stream("POST", "/invocations", json=body, headers=headers) as reply,
    ):
        assert reply.status_code == 200
        events = [event async for event in sse_events(reply.aiter_lines())]
        return events, dict(reply.headers)


async def test_stream_wire_format_is_id_and_json_data_lines(example_server: Server) -> None:
    async with (
        example_server.async_client() as client,
        client.stream("POST", "/invocations", json={"count": 2, "delay": 0}) as reply,
    ):
        lines = [line async for line in reply.aiter_lines()]

    assert lines[:6] == ["id: 1", 'data: "Chunk 1"', "", "id: 2", 'data: "Chunk 2"', ""]
    assert lines[6:8] == ["event: done", "id: 3"]
    assert lines[8].startswith("data: {")
    assert lines[9:] == [""]


async def test_stream_chunks_arrive_in_order_then_done(example_server: Server) -> None:
    events, headers = await collect(
        example_server,
        {"count": 5, "delay": 0},
        **{"X-PPIO-Session-Id": "stream-s1", "X-PPIO-Request-Id": "stream-r1"},
    )

    assert headers["content-type"].startswith("text/event-stream")
    assert headers["x-ppio-request-id"] == "stream-r1"
    assert headers["x-ppio-session-id"] == "stream-s1"
    chunks, done = events[:-1], events[-1]
    assert [(e.event, e.id, json.loads(e.data)) for e in chunks] == [
        ("message", str(i), f"Chunk {i}") for i in range(1, 6)
    ]
    assert done.event == "done"
    assert done.id == "6"
    summary = json.loads(done.data)
    assert summary["request_id"] == "stream-r1"
    assert summary["session_id"] == "stream-s1"
    assert summary["chunks"] == 5
    assert 0 <= summary["duration"] < 5


async def test_stream_first_chunk_arrives_before_second_is_produced(
    example_server: Server,
) -> None:
    arrivals: list[tuple[str, float]] = []
    async with example_server.async_client() as client:
        start = time.monotonic()
        async with client.stream("POST", "/invocations", json={"count": 3, "delay": 0.3}) as reply:
            async for event in sse_events(reply.aiter_lines()):
                arrivals.append((event.data, time.monotonic() - start))

    assert [data for data, _ in arrivals[:3]] == ['"Chunk 1"', '"Chunk 2"', '"Chunk 3"']
    first, total = arrivals[0][1], arrivals[-1][1]
    assert first < 0.6, arrivals  # written as produced, not buffered to the end
    assert total >= 0.9, arrivals
    assert arrivals[1][1] - first >= 0.2, arrivals


async def test_stream_on_each_backend_is_incremental_and_ordered(anyio_server: Server) -> None:
    arrivals: list[tuple[SSEEvent, float]] = []
    async with anyio_server.async_client() as client:
        start = time.monotonic()
        async with client.stream("POST", "/invocations", json={"count": 3, "delay": 0.3}) as reply:
            async for event in sse_events(reply.aiter_lines()):
                arrivals.append((event, time.monotonic() - start))

    events = [event for event, _ in arrivals]
    assert [(e.id, e.data) for e in events[:3]] == [
        ("1", '"Chunk 1"'),
        ("2", '"Chunk 2"'),
        ("3", '"Chunk 3"'),
    ]
    assert events[3].event == "done"
    assert len(events) == 4
    assert arrivals[0][1] < 0.6, arrivals
    assert arrivals[-1][1] >= 0.9, arrivals


async def test_streamed_json_values_round_trip_exactly(anyio_server: Server) -> None:
    items = [
        "two\nlines",
        {"nested": {"list": [1, 2.5, None, True]}, "text": "naïve ☃ 漢字"},
        ["a", 1],
        None,
        42,
        "",
    ]
    events, _ = await collect(anyio_server, {"items": items})

    assert [e.event for e in events] == ["message"] * len(items) + ["done"]
    assert [json.loads(e.data) for e in events[:-1]] == items
    assert all("\n" not in e.data for e in events)  # one data line per event


async def test_ping_is_busy_while_a_stream_is_open(anyio_server: Server) -> None:
    async with (
        anyio_server.async_client() as client,
        anyio_server.async_client() as pinger,
        client.stream("POST", "/invocations", json={"count": 2, "delay": 0.3}) as reply,
    ):
        lines = reply.aiter_lines()
        assert await anext(lines) == "id: 1"
        during = (await pinger.get("/ping")).json()["status"]
        rest = [line async for line in lines]
    after = (await pinger_get(anyio_server))["status"]

    assert during == "HealthyBusy"
    assert "event: done" in rest
    assert after == "Healthy"


async def pinger_get(server: Server) -> dict:
    async with server.async_client() as client:
        return dict((await client.get("/ping")).json())


async def test_mid_stream_exception_ends_with_error_event(anyio_server: Server) -> None:
    events, _ = await collect(
        anyio_server,
        {"count": 5, "delay": 0, "fail_after": 2},
        **{"X-PPIO-Request-Id": "fail-mid"},
    )

    assert [(e.event, e.data) for e in events[:2]] == [
        ("message", '"Chunk 1"'),
        ("message", '"Chunk 2"'),
    ]
    assert len(events) == 3  # no "done" after the error
    error = events[2]
    assert error.event == "error"
    assert error.id == "3"
    assert json.loads(error.data) == {
        "error": {
            "type": "InvocationError",
            "message": "ValueError: exploded after 2 chunks",
            "request_id": "fail-mid",
        }
    }


async def test_stream_failing_before_first_chunk_sends_only_the_error(
    anyio_server: Server,
) -> None:
    events, _ = await collect(anyio_server, {"count": 3, "fail_after": 0})

    assert [(e.event, e.id) for e in events] == [("error", "1")]
    assert json.loads(events[0].data)["error"]["type"] == "InvocationError"


async def test_server_streams_again_after_a_failed_stream(anyio_server: Server) -> None:
    await collect(anyio_server, {"count": 2, "fail_after": 1})
    events, _ = await collect(anyio_server, {"count": 2, "delay": 0})

    assert [e.event for e in events] == ["message", "message", "done"]
