"""Slow and oversized clients: header and body deadlines, readable 413s.

Issue 11 item 7. A client that has not completed its request headers within
``header_timeout`` is disconnected (with a 408 when it had started a
request), while an idle keep-alive connection between requests is not; a
body that has not fully arrived within ``body_timeout`` gets a 408 envelope;
a body over the size limit gets a 413 the client can read, whether it is
chunked or declares its length (it used to be a connection reset).
"""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import anyio.abc
import pytest

from .conftest import Server, serve
from .raw import build_request, connect, read_reply

pytestmark = pytest.mark.anyio

ALPHA = [("authorization", "Bearer secret-alpha"), ("content-type", "application/json")]
LIMIT = 8 * 1024 * 1024  # the front door's max_request_size
SLACK = 3.0  # seconds of scheduling slack on a busy machine


async def _read_all(stream: anyio.abc.ByteStream) -> bytes:
    got = bytearray()
    try:
        while True:
            got += await stream.receive()
    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
        pass
    return bytes(got)


async def _drip(stream: anyio.abc.ByteStream, data: bytes, every: float) -> None:
    """Send ``data`` a byte at a time; stop quietly when the server hangs up."""
    try:
        for byte in data:
            await stream.send(bytes([byte]))
            await anyio.sleep(every)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass


async def _slow_headers(server: Server, out: list[tuple[float, bytes]]) -> None:
    request = build_request("GET", "/v1/sessions", ALPHA[:1], close=False)
    started = anyio.current_time()
    async with await connect(server.target) as stream, anyio.create_task_group() as tg:
        tg.start_soon(_drip, stream, request, 0.2)  # ~20 s for the whole request
        got = await _read_all(stream)
        tg.cancel_scope.cancel()
    out.append((anyio.current_time() - started, got))


async def _keep_alive(server: Server, idle: float) -> list[int]:
    """Two requests on one connection, ``idle`` seconds apart."""
    statuses = []
    async with await connect(server.target) as stream:
        for pause in (idle, 0):
            await stream.send(build_request("GET", "/v1/sessions", ALPHA[:1], close=False))
            statuses.append((await read_reply(stream)).status)
            await anyio.sleep(pause)
    return statuses


async def test_slow_headers_are_cut_off_and_idle_keep_alive_is_not(tmp_path: Path) -> None:
    timeout = 0.5
    async with serve(tmp_path, header_timeout=timeout) as server:
        slow: list[tuple[float, bytes]] = []
        silent: list[tuple[float, bytes]] = []
        kept: list[int] = []

        async def keep_alive() -> None:
            kept.extend(await _keep_alive(server, 1.5 * timeout))

        async def silent_client() -> None:  # connects and never sends a byte
            started = anyio.current_time()
            async with await connect(server.target) as stream:
                got = await _read_all(stream)
            silent.append((anyio.current_time() - started, got))

        with anyio.fail_after(timeout + 2 * timeout + SLACK + 5):
            async with anyio.create_task_group() as tg:
                for _ in range(50):
                    tg.start_soon(_slow_headers, server, slow)
                tg.start_soon(silent_client)
                tg.start_soon(keep_alive)

        assert len(slow) == 50
        for took, got in slow:
            assert timeout * 0.9 <= took <= timeout + SLACK, took
            assert got.startswith(b"HTTP/1.1 408 "), got
            assert b"connection: close" in got.lower()
        [(took, got)] = silent
        assert timeout * 0.9 <= took <= timeout + SLACK
        assert got == b""
        assert kept == [200, 200]  # idle 1.5 x header_timeout, still served
        await server.ping()


async def test_without_a_header_timeout_slow_headers_stay(tmp_path: Path) -> None:
    """The control: with ``header_timeout=None`` nothing cuts a slow client off early."""
    async with serve(tmp_path, header_timeout=None) as server:
        slow: list[tuple[float, bytes]] = []
        with anyio.move_on_after(1.0):
            await _slow_headers(server, slow)
        assert slow == []  # still connected, still dripping, when we gave up


async def test_a_slow_body_gets_a_408_and_a_timely_one_gets_through(tmp_path: Path) -> None:
    async with serve(tmp_path, body_timeout=0.5) as server:
        body = b'{"template_id": "fuzz", "metadata": {"pad": "' + b"x" * 40 + b'"}}'
        head, _, _ = build_request("POST", "/v1/sessions", ALPHA, body, close=False).partition(
            b"\r\n\r\n"
        )
        started = anyio.current_time()
        async with await connect(server.target) as stream, anyio.create_task_group() as tg:
            await stream.send(head + b"\r\n\r\n")
            tg.start_soon(_drip, stream, body, 0.05)  # ~4 s for the body
            reply = await read_reply(stream)
            tg.cancel_scope.cancel()
        took = anyio.current_time() - started
        assert reply.status == 408, reply
        assert 0.45 <= took <= 0.5 + SLACK, took
        assert reply.header("connection") == "close"
        assert json.loads(reply.body)["error"]["type"] == "RequestTimeoutError"

        # In three parts, well within the deadline: created.
        async with await connect(server.target) as stream:
            await stream.send(head + b"\r\n\r\n")
            for part in (body[:10], body[10:30], body[30:]):
                await anyio.sleep(0.05)
                await stream.send(part)
            reply = await read_reply(stream)
        assert reply.status == 201, reply
        await server.ping()


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_an_oversized_body_gets_a_readable_413(
    tmp_path: Path, tcp: bool, framing: str
) -> None:
    """9 MiB against the 8 MiB limit: the client finishes writing and reads the 413.

    Before the fix the server replied at once and closed with the body unread,
    and the client's connection was reset (its send failed, the 413 was lost).
    """
    async with serve(tmp_path, tcp=tcp) as server:
        body = b"x" * (LIMIT + 1024 * 1024)
        request = build_request("POST", "/v1/sessions", ALPHA, body, chunked=framing == "chunked")
        async with await connect(server.target) as stream:
            with anyio.fail_after(30):
                await stream.send(request)
                reply = await read_reply(stream)
        assert reply.status == 413, reply
        assert reply.header("connection") == "close"
        assert json.loads(reply.body)["error"]["type"] == "RequestTooLargeError"
        await server.ping()


async def test_a_body_longer_than_its_content_length(tmp_path: Path) -> None:
    """The declared length is the body; the rest is the next request (garbage: a 400)."""
    async with serve(tmp_path) as server:
        body = b'{"template_id": "fuzz"}'
        request = build_request(
            "POST", "/v1/sessions", ALPHA, body + b"GARBAGE\r\n\r\n", close=False
        )
        request = request.replace(
            b"content-length: %d" % (len(body) + 11), b"content-length: %d" % len(body)
        )
        async with await connect(server.target) as stream:
            await stream.send(request)
            first = await read_reply(stream)
            second = await read_reply(stream)
        assert first.status == 201, first
        assert second.status == 400, second
        await server.ping()
