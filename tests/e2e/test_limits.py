"""max_request_size and the per-invocation timeout, with async and sync entrypoints."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest

from tests.e2e.helpers import (
    AGENTS,
    Server,
    assert_error,
    running,
    sse_events,
)

LIMITS = AGENTS / "limits_agent.py"


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Server]]:
    """Both apps of limits_agent.py (1 KiB bodies, 0.5 s timeout), booted in parallel."""
    async_server = Server(LIMITS, app="async_app")
    sync_server = Server(LIMITS, app="sync_app")
    with running(async_server, sync_server):
        yield {"async": async_server, "sync": sync_server}


@pytest.fixture
def async_server(servers: dict[str, Server]) -> Server:
    return servers["async"]


@pytest.fixture
def sync_server(servers: dict[str, Server]) -> Server:
    return servers["sync"]


def two_kib_body() -> bytes:
    body = b'{"pad": "' + b"x" * 2048 + b'"}'
    assert len(body) > 2048
    return body


def test_body_under_the_limit_is_accepted(async_server: Server) -> None:
    with async_server.client() as client:
        reply = client.post("/invocations", json={"pad": "x" * 900})

    assert reply.status_code == 200
    assert reply.json()["result"] == {"keys": ["pad"]}


def test_body_of_exactly_the_limit_is_accepted_one_more_byte_is_not(
    async_server: Server,
) -> None:
    def body_of(size: int) -> bytes:
        body = b'{"pad": "' + b"x" * (size - 11) + b'"}'
        assert len(body) == size
        return body

    with async_server.client() as client:
        at_limit = client.post(
            "/invocations", content=body_of(1024), headers={"Content-Type": "application/json"}
        )
        over = client.post(
            "/invocations", content=body_of(1025), headers={"Content-Type": "application/json"}
        )

    assert at_limit.status_code == 200
    assert_error(over, 413, "RequestTooLargeError")


def test_body_over_the_limit_with_content_length_is_413(async_server: Server) -> None:
    with async_server.client() as client:
        reply = client.post(
            "/invocations",
            content=two_kib_body(),
            headers={"Content-Type": "application/json", "X-PPIO-Request-Id": "big-1"},
        )

    error = assert_error(reply, 413, "RequestTooLargeError")
    assert "1024" in error["message"]
    assert error["request_id"] == "big-1"


async def post_chunked(server: Server, data: bytes, chunk_size: int) -> httpx.Response:
    """POST ``data`` with ``Transfer-Encoding: chunked`` (no Content-Length)."""

    async def body() -> AsyncIterator[bytes]:
        for i in range(0, len(data), chunk_size):
            yield data[i : i + chunk_size]

    async with server.async_client() as client:
        request = client.build_request(
            "POST", "/invocations", content=body(), headers={"Content-Type": "application/json"}
        )
        assert "content-length" not in request.headers
        assert request.headers["transfer-encoding"] == "chunked"
        return await client.send(request)


@pytest.mark.anyio
async def test_chunked_body_over_the_limit_without_content_length_is_413(
    async_server: Server,
) -> None:
    reply = await post_chunked(async_server, two_kib_body(), chunk_size=256)

    error = assert_error(reply, 413, "RequestTooLargeError")
    assert "1024" in error["message"]


@pytest.mark.anyio
async def test_client_always_receives_the_413_for_a_body_still_being_sent(
    async_server: Server,
) -> None:
    body = b'{"pad": "' + b"x" * 65536 + b'"}'
    for _ in range(5):
        reply = await post_chunked(async_server, body, chunk_size=256)
        assert_error(reply, 413, "RequestTooLargeError")


@pytest.mark.anyio
async def test_chunked_body_under_the_limit_is_accepted(async_server: Server) -> None:
    async def body() -> AsyncIterator[bytes]:
        for part in (b'{"a": ', b'"first", ', b'"b": ', b'"second"}'):
            yield part

    async with async_server.async_client() as client:
        reply = await client.post(
            "/invocations", content=body(), headers={"Content-Type": "application/json"}
        )

    assert reply.status_code == 200
    assert reply.json()["result"] == {"keys": ["a", "b"]}


def test_server_serves_after_a_413(async_server: Server) -> None:
    with async_server.client() as client:
        client.post(
            "/invocations", content=two_kib_body(), headers={"Content-Type": "application/json"}
        )
        reply = client.post("/invocations", json={"ok": 1})

    assert reply.status_code == 200


# The sync call's thread cannot be cancelled: it sleeps on, abandoned, after
# the 504, so it sleeps less than the async one.
@pytest.mark.parametrize(("kind", "sleep"), [("async", 5), ("sync", 1.5)])
def test_slow_entrypoint_times_out_with_504_promptly(
    servers: dict[str, Server], kind: str, sleep: float
) -> None:
    with servers[kind].client() as client:
        start = time.monotonic()
        reply = client.post(
            "/invocations", json={"sleep": sleep}, headers={"X-PPIO-Request-Id": f"slow-{kind}"}
        )
        elapsed = time.monotonic() - start

    error = assert_error(reply, 504, "InvocationTimeoutError")
    assert error["request_id"] == f"slow-{kind}"
    assert "0.5" in error["message"]
    assert 0.45 <= elapsed < 1.5, elapsed


@pytest.mark.anyio
async def test_stream_running_past_the_timeout_ends_with_a_timeout_error_event(
    async_server: Server,
) -> None:
    async with (
        async_server.async_client() as client,
        client.stream("POST", "/invocations", json={"stream_every": 0.2}) as reply,
    ):
        start = time.monotonic()
        events = [event async for event in sse_events(reply.aiter_lines())]
        elapsed = time.monotonic() - start

    assert [(e.event, e.data) for e in events[:2]] == [("message", "1"), ("message", "2")]
    assert len(events) == 3
    assert events[2].event == "error"
    assert json.loads(events[2].data)["error"]["type"] == "InvocationTimeoutError"
    assert elapsed < 1.5


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_timeout_flag_on_the_command_line_bounds_invocations(
    spawn: Callable[..., Server], backend: str
) -> None:
    server = spawn(AGENTS / "behaviour_agent.py", "--timeout", "0.3", backend=backend)
    with server.client() as client:
        start = time.monotonic()
        slow = client.post("/invocations", json={"mode": "sleep", "seconds": 3})
        elapsed = time.monotonic() - start
        fast = client.post("/invocations", json={"mode": "sleep", "seconds": 0.05})

    assert_error(slow, 504, "InvocationTimeoutError")
    assert elapsed < 1.5
    assert fast.status_code == 200


def test_fast_call_within_the_timeout_succeeds(sync_server: Server) -> None:
    with sync_server.client() as client:
        reply = client.post("/invocations", json={"sleep": 0.1})

    assert reply.status_code == 200
    assert reply.json()["result"] == {"keys": ["sleep"]}
