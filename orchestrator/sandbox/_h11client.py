"""A lean HTTP/1.1 client for process sandboxes: h11 over anyio byte streams.

The orchestrator speaks to each sandbox over its own Unix socket (or a
loopback TCP port): one request at a time per turn, sometimes a ``/ping``
alongside. A general-purpose client (httpx) spends most of a turn's
orchestrator CPU on machinery this needs none of (URLs, a generic pool,
request and response models, TLS, decoders), so :class:`H11Client` does
only this:

* **A tiny pool.** Up to ``max_idle`` (2) idle keep-alive connections; an
  exchange takes an idle one (the most recently used) or connects a new one
  and, when its response is read to the end and both sides allow it, gives
  the connection back. An idle connection that became readable (the server
  closed it, or sent stray bytes) is dropped before use, as httpcore does.
  A request is never retried: a POST may have reached the agent.
* **No hand-written HTTP.** h11 frames requests and parses responses
  (Content-Length, chunked, read-until-close); the bytes go through
  ``anyio.connect_unix`` / ``anyio.connect_tcp`` streams, so asyncio and
  trio both work.
* **Streaming.** :meth:`H11Client.send` returns once the response's head
  is in; :meth:`Response.receive` hands out body pieces as they arrive and
  reads from the socket only when asked: a slow reader leaves the bytes in
  the kernel and the server's writes block (backpressure).
* **Timeouts.** Connecting is bounded (``connect_timeout``) and so is
  writing a request (``write_timeout``; a request no bigger than
  :data:`SMALL_WRITE` goes to an idle connection's empty socket buffer
  without waiting, and skips the timer). Reading has no deadline here: the
  caller bounds the exchange with a cancel scope (the session actor owns a
  turn's deadline; ``/ping`` uses ``anyio.fail_after``).
* **Cancellation.** Cancelling an exchange at any point, or closing a
  response before its end, closes its connection: the server sees the
  disconnect (and hypercorn cancels the request's handler, so an agent's
  generator stops).

Every failure of a connection is a :class:`TransportError`, and the
connection is closed: :class:`ConnectError` (nobody listens),
:class:`ConnectionClosedError` (closed or reset before the response was
complete), :class:`ProtocolError` (the bytes are not an HTTP/1.1
response) and :class:`TransportTimeout` (connecting or writing took too
long; also a ``TimeoutError``).
"""

from __future__ import annotations

import contextlib
import select
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from pathlib import Path

import anyio
import h11
from anyio.abc import ByteStream, SocketAttribute

__all__ = [
    "SMALL_WRITE",
    "ConnectError",
    "ConnectionClosedError",
    "H11Client",
    "ProtocolError",
    "Response",
    "TransportError",
    "TransportTimeout",
]

RECEIVE_SIZE = 65536
"""The most bytes taken from the socket at a time."""
SMALL_WRITE = 16384
"""Requests up to this size are written without a timer (they cannot wait)."""

_Connector = Callable[[], Awaitable[ByteStream]]
_CONNECTION_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


class TransportError(Exception):
    """An exchange failed at the connection level; its connection is closed."""


class ConnectError(TransportError):
    """Could not connect to the server."""


class ConnectionClosedError(TransportError):
    """The server closed or reset the connection before the response was complete."""


class ProtocolError(TransportError):
    """The server answered something that is not a valid HTTP/1.1 response."""


class TransportTimeout(TransportError, TimeoutError):
    """Connecting, or writing the request, took longer than allowed."""


class _Connection:
    """One socket and its h11 state machine."""

    __slots__ = ("eof", "fd", "h11", "stream")

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.eof = False
        try:
            self.fd: int | None = stream.extra(SocketAttribute.raw_socket).fileno()
        except anyio.TypedAttributeLookupError:
            self.fd = None

    def reusable(self) -> bool:
        """Idle, and nothing came from the server since its last response (EOF, stray bytes)."""
        conn = self.h11
        if conn.our_state is not h11.IDLE or conn.their_state is not h11.IDLE:
            return False
        data, closed = conn.trailing_data
        if data or closed:
            return False
        if self.fd is None:
            return True
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        return not poller.poll(0)

    async def next_event(self) -> h11.Event:
        """The server's next event, reading from the socket as h11 needs."""
        conn = self.h11
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                if self.eof:
                    raise ConnectionClosedError(
                        f"the server closed the connection before the response was complete ({exc})"
                    ) from exc
                raise ProtocolError(f"the server's reply is not valid HTTP/1.1: {exc}") from exc
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]  # PAUSED cannot happen mid-response
            try:
                data = await self.stream.receive(RECEIVE_SIZE)
            except anyio.EndOfStream:
                data = b""
                self.eof = True
            except _CONNECTION_ERRORS as exc:
                raise ConnectionClosedError(f"the connection broke: {exc!r}") from exc
            conn.receive_data(data)

    async def close(self) -> None:
        """Close the socket now, even inside a cancelled scope."""
        await anyio.aclose_forcefully(self.stream)


class Response:
    """A response whose head has arrived; its body is read with :meth:`receive` or :meth:`read`.

    ``headers`` are h11's: ``(name, value)`` byte pairs, names in lower
    case. A response read to its end gives its connection back to the
    pool; :meth:`aclose` before that closes the connection.
    """

    __slots__ = ("_client", "_conn", "headers", "status")

    def __init__(self, client: H11Client, conn: _Connection, head: h11.Response) -> None:
        self._client = client
        self._conn: _Connection | None = conn
        self.status: int = head.status_code
        self.headers: list[tuple[bytes, bytes]] = list(head.headers)

    def header(self, name: bytes) -> bytes:
        """The first value of header ``name`` (lower case), or ``b""``."""
        for key, value in self.headers:
            if key == name:
                return value
        return b""

    @property
    def complete(self) -> bool:
        """True once the body was read to its end (or the response was closed)."""
        return self._conn is None

    async def receive(self) -> bytes:
        """The next piece of the body as it arrives; ``b""`` at its end.

        Raises :class:`TransportError` (the connection is closed then); a
        cancellation also closes the connection.
        """
        conn = self._conn
        if conn is None:
            return b""
        try:
            while True:
                event = await conn.next_event()
                if type(event) is h11.Data:
                    if event.data:
                        return bytes(event.data)  # h11 hands out bytearrays
                elif type(event) is h11.EndOfMessage:
                    break
                else:  # pragma: no cover - h11 sends nothing else mid-body to a client
                    raise ProtocolError(f"unexpected {type(event).__name__} in a response body")
        except BaseException:
            self._conn = None
            await self._client._discard(conn)
            raise
        self._conn = None
        await self._client._release(conn)
        return b""

    async def read(self) -> bytes:
        """The rest of the body."""
        chunks = []
        while chunk := await self.receive():
            chunks.append(chunk)
        return b"".join(chunks)

    async def finish(self, timeout: float, limit: int = RECEIVE_SIZE) -> None:
        """Read and drop the rest of the body, if it comes within ``timeout`` and ``limit`` bytes.

        For a caller that has all it wanted (a stream's last event): the
        connection then goes back to the pool; else it is closed. Never
        raises :class:`TransportError`: what broke after the end is the next
        exchange's business.
        """
        if self._conn is None:
            return
        with anyio.move_on_after(timeout), contextlib.suppress(TransportError):
            received = 0
            while received <= limit and (chunk := await self.receive()):
                received += len(chunk)
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection unless the body was read to its end. Idempotent."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._client._discard(conn)


class H11Client:
    """HTTP/1.1 to one server, over at most a few keep-alive connections.

    ``connect`` opens a new byte stream to the server (see :meth:`unix`
    and :meth:`tcp`); ``host`` is the ``Host`` header sent.
    """

    def __init__(
        self,
        connect: _Connector,
        host: str,
        *,
        max_idle: int = 2,
        connect_timeout: float = 10.0,
        write_timeout: float = 60.0,
    ) -> None:
        self._connect = connect
        self._host = host
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self.write_timeout = write_timeout
        self._idle: list[_Connection] = []
        self._active: set[_Connection] = set()
        self._closed = False
        self.connects = 0
        """How many connections were opened (tests and diagnostics)."""

    @classmethod
    def unix(cls, path: str | Path, *, connect_timeout: float = 10.0) -> H11Client:
        """A client of the server on Unix socket ``path``."""
        connect = partial(anyio.connect_unix, str(path))
        return cls(connect, "sandbox", connect_timeout=connect_timeout)

    @classmethod
    def tcp(cls, host: str, port: int, *, connect_timeout: float = 10.0) -> H11Client:
        """A client of the server on ``host:port``."""
        connect = partial(anyio.connect_tcp, host, port)
        return cls(connect, f"{host}:{port}", connect_timeout=connect_timeout)

    async def send(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> Response:
        """Send a request and wait for the head of its response; the body is the caller's to read.

        The caller must read the response to its end or :meth:`Response.aclose`
        it. Raises :class:`TransportError`; ``ValueError`` for a request h11
        refuses to write (a bad header), before anything is sent.
        """
        conn = await self._acquire()
        try:
            state = conn.h11
            head = [("host", self._host), ("content-length", str(len(body))), *headers]
            try:
                data = state.send(h11.Request(method=method, target=target, headers=head))
                if body:
                    data += state.send(h11.Data(data=body))
                data += state.send(h11.EndOfMessage())
            except h11.LocalProtocolError as exc:
                raise ValueError(f"cannot send this request: {exc}") from exc
            await self._write(conn, data)
            while True:
                event = await conn.next_event()
                if type(event) is h11.Response:
                    return Response(self, conn, event)
                if type(event) is not h11.InformationalResponse:  # pragma: no cover
                    raise ProtocolError(f"unexpected {type(event).__name__} instead of a response")
        except BaseException:
            await self._discard(conn)
            raise

    async def request(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> tuple[int, bytes]:
        """Send a request and read its whole response: ``(status, body)``."""
        response = await self.send(method, target, headers, body)
        return response.status, await response.read()

    async def aclose(self) -> None:
        """Close every connection, idle or in use (their exchanges fail). Idempotent."""
        self._closed = True
        connections = [*self._idle, *self._active]
        self._idle.clear()
        self._active.clear()
        for conn in connections:
            await conn.close()

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` was called."""
        return self._closed

    @property
    def idle_connections(self) -> int:
        """Connections waiting in the pool."""
        return len(self._idle)

    # --- the pool ------------------------------------------------------------------------

    async def _acquire(self) -> _Connection:
        if self._closed:
            raise ConnectionClosedError("the client is closed")
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.reusable():
                self._active.add(conn)
                return conn
            await conn.close()
        try:
            with anyio.fail_after(self.connect_timeout):
                stream = await self._connect()
        except TimeoutError as exc:
            raise TransportTimeout(
                f"connecting to {self._host} took longer than {self.connect_timeout:g} s"
            ) from exc
        except OSError as exc:
            raise ConnectError(f"cannot connect to {self._host}: {exc}") from exc
        self.connects += 1
        conn = _Connection(stream)
        if self.closed:  # closed while connecting
            await conn.close()
            raise ConnectionClosedError("the client is closed")
        self._active.add(conn)
        return conn

    async def _write(self, conn: _Connection, data: bytes) -> None:
        try:
            if len(data) <= SMALL_WRITE:
                await conn.stream.send(data)
            else:
                with anyio.fail_after(self.write_timeout):
                    await conn.stream.send(data)
        except TimeoutError as exc:
            raise TransportTimeout(
                f"writing a request of {len(data)} bytes took longer than {self.write_timeout:g} s"
            ) from exc
        except _CONNECTION_ERRORS as exc:
            raise ConnectionClosedError(f"the connection broke: {exc!r}") from exc

    async def _release(self, conn: _Connection) -> None:
        """Back to the pool after a complete exchange, when both sides allow it."""
        self._active.discard(conn)
        state = conn.h11
        if (
            not self._closed
            and state.our_state is h11.DONE
            and state.their_state is h11.DONE
            and len(self._idle) < self.max_idle
        ):
            state.start_next_cycle()
            self._idle.append(conn)
        else:
            await conn.close()

    async def _discard(self, conn: _Connection) -> None:
        self._active.discard(conn)
        await conn.close()
