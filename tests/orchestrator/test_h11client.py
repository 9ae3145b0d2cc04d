"""H11Client, the process sandboxes' HTTP/1.1 client, against scripted servers on real sockets.

Each test serves a small handler per connection on a Unix socket (once on
TCP): h11 on the server side where the reply is ordinary HTTP, raw bytes
where it must not be (garbage, a body cut short).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import h11
import pytest

from ppio_sandbox.agent_runtime.errors import InvocationError, SandboxCrashedError
from ppio_sandbox.agent_runtime.sse import encode_event
from ppio_sandbox.orchestrator.sandbox import _process_events
from ppio_sandbox.orchestrator.sandbox._h11client import (
    ConnectError,
    ConnectionClosedError,
    H11Client,
    ProtocolError,
    TransportTimeout,
)
from ppio_sandbox.orchestrator.sandbox._process_events import EventStream


class Peer:
    """The server's side of one connection."""

    def __init__(self, server: Server, stream: anyio.abc.ByteStream) -> None:
        self.server = server
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER)

    async def request(self) -> tuple[h11.Request, bytes] | None:
        """The next request and its body; None when the client closed the connection."""
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        head: h11.Request | None = None
        body = b""
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await self.stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    data = b""
                self.h11.receive_data(data)
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                self.server.requests.append(head.target.decode())
                return head, body
            else:
                assert isinstance(event, h11.ConnectionClosed), event
                return None

    async def send(self, *events: h11.Event) -> None:
        await self.stream.send(b"".join(self.h11.send(event) or b"" for event in events))

    async def respond(self, body: bytes, status: int = 200, **headers: str) -> None:
        """A reply with Content-Length."""
        fields = [("content-length", str(len(body))), *headers.items()]
        head = h11.Response(status_code=status, headers=fields)
        await self.send(head, h11.Data(data=body), h11.EndOfMessage())

    async def start_chunked(self, content_type: str = "application/json") -> None:
        """The head of a chunked reply; each :meth:`chunk` is one chunk on the wire."""
        fields = [("content-type", content_type), ("transfer-encoding", "chunked")]
        await self.send(h11.Response(status_code=200, headers=fields))

    async def chunk(self, data: bytes) -> None:
        await self.send(h11.Data(data=data))

    async def end(self) -> None:
        await self.send(h11.EndOfMessage())

    async def wait_closed(self) -> None:
        """Until the client closes the connection (what it sends meanwhile is dropped)."""
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
            while True:
                await self.stream.receive()


Handler = Callable[[Peer], Awaitable[None]]


class Server:
    """Connections accepted, targets requested, connections ended; ``stopping`` at the end."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[str] = []
        self.closed = 0
        self.stopping = anyio.Event()

    async def handle(self, stream: anyio.abc.ByteStream) -> None:
        self.connections += 1
        async with stream:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await self.handler(Peer(self, stream))
        self.closed += 1


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory for Unix sockets (their paths are limited to ~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="h11c-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@asynccontextmanager
async def serving(
    handler: Handler, socket_dir: Path, *, tcp: bool = False, **options: Any
) -> AsyncIterator[tuple[Server, H11Client]]:
    """A server running ``handler`` per connection, and a client of it (closed after).

    At the end the client closes its connections and the handlers end by
    themselves (seeing EOF, or ``stopping``) before the server is cancelled:
    cancelling a read on an asyncio Unix stream the instant it becomes
    readable makes anyio's reader callback set a cancelled future (logged
    as InvalidStateError, which the anyio pytest plugin raises).
    """
    server = Server(handler)
    listener: anyio.abc.Listener[Any]
    if tcp:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        client = H11Client.tcp("127.0.0.1", port, **options)
    else:
        path = socket_dir / "s.sock"
        listener = await anyio.create_unix_listener(path)
        client = H11Client.unix(path, **options)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, server.handle)
        try:
            yield server, client
        finally:
            server.stopping.set()
            await client.aclose()
            with anyio.move_on_after(5):
                while server.closed < server.connections:
                    await anyio.sleep(0.005)
            tg.cancel_scope.cancel()
    await listener.aclose()


async def keep_answering(peer: Peer) -> None:
    """``{"n": <request number on this connection>}`` to every request, with Content-Length."""
    n = 0
    while await peer.request() is not None:
        n += 1
        await peer.respond(b'{"n": %d}' % n, **{"content-type": "application/json"})


async def broken(exc: BaseException) -> SandboxCrashedError:
    return SandboxCrashedError(f"broken: {type(exc).__name__}: {exc}")


# --- keep-alive and framing -------------------------------------------------------------------


@pytest.mark.anyio
async def test_keep_alive_reuses_one_connection_across_turns(socket_dir: Path) -> None:
    async with serving(keep_answering, socket_dir) as (server, client):
        replies = [await client.request("POST", "/invocations", body=b"{}") for _ in range(5)]
        assert replies == [(200, b'{"n": %d}' % n) for n in range(1, 6)]
        assert server.connections == client.connects == 1
        assert client.idle_connections == 1
        assert server.requests == ["/invocations"] * 5


@pytest.mark.anyio
async def test_content_length_and_chunked_replies_on_one_connection(socket_dir: Path) -> None:
    async def handler(peer: Peer) -> None:
        assert await peer.request() is not None
        await peer.respond(b"x" * 100_000)  # more than one read
        assert await peer.request() is not None
        await peer.start_chunked()
        for piece in (b"[1,", b"2,", b"3]"):
            await peer.chunk(piece)
        await peer.end()
        await keep_answering(peer)

    async with serving(handler, socket_dir) as (server, client):
        assert await client.request("GET", "/length") == (200, b"x" * 100_000)
        response = await client.send("GET", "/chunked")
        assert response.header(b"transfer-encoding") == b"chunked"
        assert await response.read() == b"[1,2,3]"
        assert response.complete
        assert (await client.request("GET", "/after"))[1] == b'{"n": 1}'
        assert server.connections == 1


@pytest.mark.anyio
async def test_a_reply_read_until_close_is_complete_and_its_connection_not_reused(
    socket_dir: Path,
) -> None:
    async def handler(peer: Peer) -> None:
        assert await peer.request() is not None
        await peer.stream.send(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")

    async with serving(handler, socket_dir) as (server, client):
        assert await client.request("GET", "/") == (200, b"all of it")
        assert client.idle_connections == 0
        assert await client.request("GET", "/") == (200, b"all of it")
        assert server.connections == client.connects == 2


@pytest.mark.anyio
async def test_an_idle_connection_the_server_closed_is_replaced_not_failed(
    socket_dir: Path,
) -> None:
    async def handler(peer: Peer) -> None:
        assert await peer.request() is not None
        await peer.respond(b"once")  # keep-alive, then the server drops it anyway

    async with serving(handler, socket_dir) as (server, client):
        assert await client.request("GET", "/") == (200, b"once")
        with anyio.fail_after(5):
            while server.closed < 1:  # the server's close has reached the client's socket
                await anyio.sleep(0.01)
        assert await client.request("GET", "/") == (200, b"once")
        assert client.connects == 2


# --- streaming ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_sse_chunks_are_passed_on_as_they_arrive(socket_dir: Path) -> None:
    first_seen = anyio.Event()

    async def handler(peer: Peer) -> None:
        assert await peer.request() is not None
        await peer.start_chunked("text/event-stream")
        await peer.chunk(encode_event(1, "one"))
        await first_seen.wait()  # the second chunk does not exist until the first was read
        # An event split mid-line, with CRLF line ends split across chunks, and a comment.
        await peer.chunk(b": keep-alive\r\n\r\nid: 2\r\nda")
        await peer.chunk(b'ta: "tw')
        await peer.chunk(b'o"\r')
        await peer.chunk(b"\n\r\n")
        await peer.chunk(encode_event(None, {"status": "ok"}, event="done"))
        await peer.end()
        await keep_answering(peer)

    async with serving(handler, socket_dir) as (server, client):
        response = await client.send("POST", "/invocations", body=b"{}")
        assert response.header(b"content-type") == b"text/event-stream"
        stream = EventStream(response, broken)
        with anyio.fail_after(5):
            assert await stream.__anext__() == "one"
        first_seen.set()
        assert [chunk async for chunk in stream] == ["two"]
        assert stream.last_event_id == "2"
        # The body was read to its end: the connection is reused.
        assert (await client.request("GET", "/ping"))[1] == b'{"n": 1}'
        assert server.connections == 1


@pytest.mark.parametrize("after_done", ["end", "close", "hang"])
@pytest.mark.anyio
async def test_a_stream_ends_at_done_whatever_the_server_does_next(
    socket_dir: Path, after_done: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_process_events, "FINISH_TIMEOUT", 0.1)

    async def handler(peer: Peer) -> None:
        assert await peer.request() is not None
        await peer.start_chunked("text/event-stream")
        await peer.chunk(encode_event(1, "one"))
        await peer.chunk(encode_event(None, {"status": "ok"}, event="done"))
        if after_done == "end":  # the body's end: the connection serves the next request
            await peer.end()
            await keep_answering(peer)
        elif after_done == "hang":  # neither the end nor a close: given up after a while
            await peer.wait_closed()
        # "close": gone without the body's end

    async with serving(handler, socket_dir) as (server, client):
        stream = EventStream(await client.send("POST", "/invocations"), broken)
        with anyio.fail_after(5):
            assert [chunk async for chunk in stream] == ["one"]
        if after_done == "end":
            assert client.idle_connections == 1
            assert await client.request("GET", "/") == (200, b'{"n": 1}')
        else:
            assert client.idle_connections == 0
            with anyio.fail_after(5):  # closed by one side or the other
                while server.closed < 1:
                    await anyio.sleep(0.01)
        assert server.connections == 1


@pytest.mark.anyio
async def test_a_reader_that_waits_holds_the_server_back(socket_dir: Path) -> None:
    event_size, events = 32 * 1024, 1024  # 32 MiB in all
    sent = 0
    buffers = 0  # what the kernel may hold between the two ends

    async def handler(peer: Peer) -> None:
        nonlocal sent, buffers
        raw = peer.stream.extra(anyio.abc.SocketAttribute.raw_socket)
        buffers = raw.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        buffers += raw.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        assert await peer.request() is not None
        await peer.start_chunked("text/event-stream")
        payload = "x" * event_size
        for i in range(events):
            data = encode_event(i, payload)
            await peer.chunk(data)
            sent += len(data)
        await peer.end()

    async with serving(handler, socket_dir) as (_, client):
        stream = EventStream(await client.send("POST", "/invocations"), broken)
        assert len(await stream.__anext__()) == event_size
        # Until the reader asks for more, the server is blocked on a full socket.
        with anyio.fail_after(10):
            while True:
                before = sent
                await anyio.sleep(0.1)
                if sent == before:
                    break
        # At most the kernel's buffers (doubled by its bookkeeping), one read and an event.
        bound = 2 * buffers + 1024 * 1024
        assert bound < events * event_size // 2
        assert 0 < sent < bound
        assert len([chunk async for chunk in stream]) == events - 1
        assert sent > events * event_size


# --- failures -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_body_cut_short_is_a_connection_closed_error(socket_dir: Path) -> None:
    async def handler(peer: Peer) -> None:
        target = (await peer.request() or (None, b""))[0]
        assert target is not None
        if target.target == b"/length":
            await peer.stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")
        elif target.target == b"/chunked":
            await peer.start_chunked("text/event-stream")
            await peer.chunk(encode_event(1, "one"))
            await peer.stream.send(b"40\r\nid: 2\ndata:")  # half a chunk, then nothing
        # else: "/nothing": closed without a reply

    async with serving(handler, socket_dir) as (_, client):
        response = await client.send("GET", "/length")
        with anyio.fail_after(5), pytest.raises(ConnectionClosedError, match="received 10 bytes"):
            await response.read()
        with anyio.fail_after(5), pytest.raises(ConnectionClosedError, match="before the resp"):
            await client.send("GET", "/nothing")
        stream = EventStream(await client.send("POST", "/chunked"), broken)
        assert await stream.__anext__() == "one"
        with anyio.fail_after(5), pytest.raises(SandboxCrashedError, match="ConnectionClosedError"):
            await stream.__anext__()
        assert client.idle_connections == 0


@pytest.mark.parametrize(
    ("garbage", "then_close"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", False),
        (b"HTTP/1.1 two hundred OK\r\n\r\n", True),
        (b"\x00\x01\x02\x03 not http \xff\r\n\r\n", False),
        (b"x" * 20_000, False),  # no line end ever: h11 gives up past its 16 KiB limit
    ],
)
@pytest.mark.anyio
async def test_garbage_is_a_protocol_error_not_a_hang(
    socket_dir: Path, garbage: bytes, then_close: bool
) -> None:
    async def handler(peer: Peer) -> None:
        assert await peer.request() is not None
        await peer.stream.send(garbage)
        if not then_close:
            await peer.wait_closed()

    async with serving(handler, socket_dir) as (server, client):
        with anyio.fail_after(5), pytest.raises(ProtocolError, match=r"not valid HTTP/1\.1"):
            await client.request("POST", "/invocations", body=b"{}")
        assert client.idle_connections == 0
        with anyio.fail_after(5):  # the client closed the connection
            while server.closed < 1:
                await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_connect_and_write_failures(socket_dir: Path) -> None:
    client = H11Client.unix(socket_dir / "nobody.sock")
    with pytest.raises(ConnectError, match="cannot connect"):
        await client.request("GET", "/ping")

    async def never_reads(peer: Peer) -> None:
        await peer.server.stopping.wait()

    async with serving(never_reads, socket_dir) as (_, client):
        client.write_timeout = 0.3
        with anyio.fail_after(5), pytest.raises(TransportTimeout, match=r"longer than 0\.3 s"):
            await client.request("POST", "/invocations", body=b"x" * (16 * 1024 * 1024))
        assert isinstance(TransportTimeout(), TimeoutError)


@pytest.mark.anyio
async def test_a_bad_header_is_refused_before_anything_is_sent(socket_dir: Path) -> None:
    async with serving(keep_answering, socket_dir) as (server, client):
        with pytest.raises(ValueError, match="cannot send"):
            await client.request("GET", "/", [("x-bad", "line\r\nbreak")])
        assert server.requests == []
        assert await client.request("GET", "/") == (200, b'{"n": 1}')


# --- cancellation and concurrency -----------------------------------------------------------


async def stream_until_closed(peer: Peer, gone: anyio.Event) -> None:
    """Answer ``/ping`` at once; stream events to anything else until the client leaves."""
    while (request := await peer.request()) is not None:
        if request[0].target == b"/ping":
            await peer.respond(b'{"status": "HealthyBusy"}')
            continue
        await peer.start_chunked("text/event-stream")
        async with anyio.create_task_group() as tg:

            async def ticks() -> None:
                with contextlib.suppress(anyio.BrokenResourceError):  # the client left
                    for i in range(1_000_000):
                        await peer.chunk(encode_event(i, i))
                        await anyio.sleep(0.005)

            tg.start_soon(ticks)
            await peer.wait_closed()
            tg.cancel_scope.cancel()
        gone.set()
        return


@pytest.mark.anyio
async def test_cancelling_mid_stream_closes_the_connection(socket_dir: Path) -> None:
    gone = anyio.Event()
    async with serving(lambda peer: stream_until_closed(peer, gone), socket_dir) as (_, client):
        stream = EventStream(await client.send("POST", "/invocations"), broken)
        got: list[int] = []
        with anyio.move_on_after(5) as scope:
            async for tick in stream:
                got.append(tick)
                if len(got) == 3:
                    scope.cancel()
        assert got == [0, 1, 2]
        with anyio.fail_after(5):
            await gone.wait()  # the server saw the disconnect
        assert client.idle_connections == 0
        with pytest.raises(StopAsyncIteration):  # a closed stream stays closed
            await stream.__anext__()


@pytest.mark.anyio
async def test_cancelling_while_waiting_for_the_reply_closes_the_connection(
    socket_dir: Path,
) -> None:
    async def silent(peer: Peer) -> None:
        assert await peer.request() is not None
        await peer.wait_closed()

    async with serving(silent, socket_dir) as (server, client):
        with anyio.move_on_after(0.2) as scope:
            await client.request("POST", "/invocations", body=b"{}")
        assert scope.cancelled_caught
        with anyio.fail_after(5):
            while server.closed < 1:
                await anyio.sleep(0.01)
        assert client.idle_connections == 0


@pytest.mark.anyio
async def test_closing_a_response_early_closes_its_connection(socket_dir: Path) -> None:
    gone = anyio.Event()
    async with serving(lambda peer: stream_until_closed(peer, gone), socket_dir) as (_, client):
        response = await client.send("POST", "/invocations")
        assert await response.receive()
        await response.aclose()
        await response.aclose()  # idempotent
        assert await response.receive() == b""
        with anyio.fail_after(5):
            await gone.wait()


@pytest.mark.anyio
async def test_ping_runs_alongside_a_streaming_turn(socket_dir: Path) -> None:
    gone = anyio.Event()
    async with serving(lambda peer: stream_until_closed(peer, gone), socket_dir) as (
        server,
        client,
    ):
        assert (await client.request("GET", "/ping"))[0] == 200
        stream = EventStream(await client.send("POST", "/invocations"), broken)
        assert await stream.__anext__() == 0
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:  # two pings at once, mid-turn
                for _ in range(2):
                    tg.start_soon(client.request, "GET", "/ping")
        assert await stream.__anext__() == 1
        assert server.connections == client.connects == 3
        assert client.idle_connections == 2  # the pool keeps two
        await stream.aclose()
        with anyio.fail_after(5):
            await gone.wait()
        assert (await client.request("GET", "/ping"))[1] == b'{"status": "HealthyBusy"}'
        assert client.connects == 3


@pytest.mark.anyio
async def test_closing_the_client_fails_the_exchange_in_flight(socket_dir: Path) -> None:
    gone = anyio.Event()
    async with serving(lambda peer: stream_until_closed(peer, gone), socket_dir) as (_, client):
        stream = EventStream(await client.send("POST", "/invocations"), broken)
        assert await stream.__anext__() == 0
        failures: list[BaseException] = []

        async def drain() -> None:
            try:
                async for _ in stream:
                    pass
            except SandboxCrashedError as exc:
                failures.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(drain)
            await anyio.sleep(0.05)
            await client.aclose()
        assert len(failures) == 1
        assert "ConnectionClosedError" in str(failures[0])
        with anyio.fail_after(5):
            await gone.wait()
        with pytest.raises(ConnectionClosedError, match="client is closed"):
            await client.request("GET", "/ping")


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_tcp_keep_alive_and_an_agent_error_event(socket_dir: Path) -> None:
    async def handler(peer: Peer) -> None:
        assert await peer.request() is not None
        await peer.start_chunked("text/event-stream")
        await peer.chunk(encode_event(1, "one"))
        error = {"type": "InvocationError", "message": "kaput"}
        await peer.chunk(encode_event(None, {"error": error}, event="error"))
        await peer.end()
        await keep_answering(peer)

    async with serving(handler, socket_dir, tcp=True) as (server, client):
        stream = EventStream(await client.send("POST", "/invocations"), broken)
        assert await stream.__anext__() == "one"
        with pytest.raises(InvocationError, match="kaput"):
            await stream.__anext__()
        assert await client.request("GET", "/ping") == (200, b'{"n": 1}')
        assert server.connections == 1
