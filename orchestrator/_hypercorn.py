"""Deadlines on reading a request, for hypercorn's HTTP/1.1 connections.

hypercorn (0.17, 0.18) has no header-read timeout. Its only timer on an
HTTP/1.1 connection is the keep-alive idle timer, which runs from the moment
the connection is accepted (or a response is finished) until the headers of
the next request are complete; bytes that arrive do not reset it. With the
orchestrator's 75 s keep-alive, a client sending its request headers a byte
at a time held its connection (and a file descriptor) for 75 s, and 2,000
such clients held 2,000. Nor is there a deadline on a request's body.

This module adds both. :func:`install` makes hypercorn build
:class:`DeadlineH11Protocol` for every HTTP/1.1 connection; it acts only when
the server's config (a :class:`Config`) sets ``header_timeout`` or
``body_timeout``, so other hypercorn servers in the same process are not
affected.

``header_timeout``
    A new connection must complete the headers of its first request within
    this many seconds of being accepted. Once a response is finished the
    connection is idle and only the keep-alive timer applies (idle keep-alive
    connections last ``keep_alive_timeout``); when the first bytes of the
    next request arrive, its headers must be complete within
    ``header_timeout`` seconds. A connection that misses the deadline is
    closed: after a ``408 Request Timeout`` (``Connection: close``) when part
    of a request had arrived, silently when nothing had.

``body_timeout``
    Once a request's headers are in, its body must be complete within this
    many seconds. The reply belongs to the application, which may be reading
    the body: if no response has started when the deadline passes, the
    application receives ``{"type": "http.disconnect", BODY_TIMEOUT_KEY:
    seconds}`` (an ASGI disconnect, with one extra key saying why), and the
    orchestrator's front door answers 408 with ``Connection: close``.
    hypercorn closes the connection after that reply, as after any reply
    sent before its request's body was read.

Both timers live only while a request is incomplete: one task per such
connection, started through hypercorn's own task group (so they work under
its asyncio and trio workers alike) and stopped through an ``anyio.Event``.
A request whose headers and body arrive in one read, the usual case, starts
none. HTTP/2 (TLS with ALPN ``h2``, or cleartext prior knowledge) and
WebSocket connections are not covered: the orchestrator serves HTTP/1.1.

One more repair, on hypercorn's trio worker only (always on, whatever the
config): a connection is written to by the application's task (the reply)
and by the reading task (hypercorn's own 400 when the client breaks the
protocol, e.g. closes its side before the body it declared is complete).
hypercorn serialises the writes but not the ``send_eof()`` with which it
closes, so the two could meet in trio's ``send_all`` and raise
``BusyResourceError``; raised in the reading task, that error escaped to
the listener's nursery and stopped the whole HTTP server (found by the
adversarial fuzzing: ``GET /nope`` with ``Content-Length: 5``, four bytes,
then a half-close). Here every write waits for the one in progress, and
nothing is written once the connection is closing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import h11
import hypercorn.config
import hypercorn.protocol
import sniffio
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream

__all__ = ["BODY_TIMEOUT_KEY", "Config", "DeadlineH11Protocol", "install"]

BODY_TIMEOUT_KEY = "ppio.body_timeout"
"""Key of the ``http.disconnect`` message an application receives when the body
it is reading is overdue; its value is ``body_timeout``."""

_TIMEOUT_BODY = b"request headers not received in time\n"
_TIMEOUT_REPLY = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\n"
    b"connection: close\r\n"
    b"\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)
_HEADERS = "headers"
_BODY = "body"


class Config(hypercorn.config.Config):
    """hypercorn's ``Config`` with the two deadlines, in seconds (None: no deadline)."""

    header_timeout: float | None = None
    body_timeout: float | None = None


def _seconds(config: Any, name: str) -> float | None:
    value = getattr(config, name, None)
    return float(value) if value is not None and value > 0 else None


class DeadlineH11Protocol(H11Protocol):
    """hypercorn's HTTP/1.1 protocol with deadlines on a request's headers and body."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout = _seconds(self.config, "header_timeout")
        self._body_timeout = _seconds(self.config, "body_timeout")
        self._timer: anyio.Event | None = None  # set to stop the running timer
        self._timer_for: str | None = None
        self._timed_out = False
        if sniffio.current_async_library() == "trio":
            self.send = _one_writer(self.send)

    async def initiate(self) -> None:
        await super().initiate()
        self._start(_HEADERS)  # the first request's headers are due too

    async def handle(self, event: Event) -> None:
        if isinstance(event, Closed):
            self._stop()
        elif self._timed_out:
            return  # closing: whatever else arrives is not read
        await super().handle(event)
        if isinstance(event, RawData):
            self._update()

    async def _create_stream(self, request: h11.Request) -> None:
        if self._timer_for == _HEADERS:
            self._stop()
        await super()._create_stream(request)

    async def _maybe_recycle(self) -> None:
        await super()._maybe_recycle()
        self._update()  # a pipelined request may be buffered, incomplete

    def _update(self) -> None:
        """Start or stop a timer for the state the connection is now in."""
        connection = self.connection
        if not isinstance(connection, h11.Connection):  # a WebSocket
            self._stop()
        elif self.stream is None:
            if self._timer_for == _BODY:
                self._stop()
            if self._partial_request():
                self._start(_HEADERS)
        elif connection.their_state is h11.SEND_BODY:
            self._start(_BODY)
        elif self._timer_for == _BODY:
            self._stop()

    def _partial_request(self) -> bool:
        """True when bytes of a request whose headers are incomplete are buffered."""
        connection = self.connection
        return (
            isinstance(connection, h11.Connection)
            and connection.their_state is h11.IDLE
            and bool(connection.trailing_data[0])
        )

    def _start(self, what: str) -> None:
        timeout = self._header_timeout if what == _HEADERS else self._body_timeout
        if timeout is None or self._timer is not None or self._timed_out:
            return
        stop = self._timer = anyio.Event()
        self._timer_for = what
        self.task_group.spawn(self._expire, stop, what, timeout)

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.set()
            self._timer = None
            self._timer_for = None

    async def _expire(self, stop: anyio.Event, what: str, timeout: float) -> None:
        stream = self.stream
        with anyio.move_on_after(timeout):
            await stop.wait()
        if stop.is_set() or self._timer is not stop:
            return
        self._timer = None
        self._timer_for = None
        if what == _HEADERS:
            self._timed_out = True
            if self._partial_request():
                await self.send(RawData(data=_TIMEOUT_REPLY))
            await self.send(Closed())
        elif (
            isinstance(stream, HTTPStream)
            and stream is self.stream
            and stream.state is ASGIHTTPState.REQUEST
            and not stream.closed
        ):
            # The application is (or should be) reading the body: it replies.
            overdue: Any = {"type": "http.disconnect", BODY_TIMEOUT_KEY: timeout}
            await stream.app_put(overdue)


def _one_writer(send: Callable[[Event], Awaitable[None]]) -> Callable[[Event], Awaitable[None]]:
    """``send`` with one write at a time, and none once the connection is closing."""
    lock = anyio.Lock(fast_acquire=True)
    closing = False

    async def serialized(event: Event) -> None:
        nonlocal closing
        if isinstance(event, RawData):
            async with lock:
                if closing:
                    return
                await send(event)
        elif isinstance(event, Closed):
            async with lock:  # the write in progress finishes first
                closing = True
            await send(event)
        else:
            await send(event)

    return serialized


def install() -> None:
    """Make hypercorn use :class:`DeadlineH11Protocol` (idempotent).

    hypercorn's ``ProtocolWrapper`` looks ``H11Protocol`` up in its module's
    namespace each time it builds a connection's protocol; both workers
    (asyncio and trio) go through it.
    """
    if getattr(hypercorn.protocol, "H11Protocol", None) is not DeadlineH11Protocol:
        setattr(hypercorn.protocol, "H11Protocol", DeadlineH11Protocol)  # noqa: B010
