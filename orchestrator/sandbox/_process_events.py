"""Reading a sandbox's HTTP replies: the JSON envelope and live SSE streams."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import msgspec

from ppio_sandbox.agent_runtime.errors import (
    InvocationError,
    PPIOAgentRuntimeError,
    SandboxCrashedError,
    error_from_envelope,
)
from ppio_sandbox.agent_runtime.protocol import decode_json
from ppio_sandbox.agent_runtime.sse import SSEEvent, iter_events

from ._h11client import Response, TransportError

__all__ = ["EventStream", "agent_error", "decode_reply"]

_ENVELOPE_KEYS = frozenset({"result", "status", "duration", "metadata"})
FINISH_TIMEOUT = 0.5
"""After a stream's last event, how long its body's end is waited for before closing instead."""


def agent_error(status: int, body: Any) -> PPIOAgentRuntimeError:
    """The error an agent's reply describes.

    A ``SandboxCrashedError`` *named by a live agent* (say, one proxying
    another) becomes ``InvocationError``: from a sandbox, that class means
    the sandbox itself died, and this one is still answering.
    """
    if not isinstance(body, dict):
        body = {"error": body} if isinstance(body, str) and body else {}
    err = error_from_envelope(status, body)
    if isinstance(err, SandboxCrashedError):
        return InvocationError(err.message, request_id=err.request_id, details=err.details)
    return err


def decode_reply(status: int, body: bytes, *, envelope: bool = True) -> Any:
    """The result of a non-streaming reply, or raise the error it carries.

    A 2xx JSON body shaped like this runtime's envelope (a dict with
    ``result`` and ``status`` and no keys but ``result``, ``status``,
    ``duration``, ``metadata``) yields its ``result``; any other body (a
    peer such as AgentCore answering the bare value) *is* the result. A body
    that is not JSON comes back as text. (An AgentCore agent whose value
    happens to look like the envelope is read as one: the shapes cannot be
    told apart.)
    """
    value: Any
    try:
        value = decode_json(body) if body else None
    except msgspec.DecodeError:
        value = body.decode("utf-8", errors="replace")
    if not 200 <= status < 300:
        raise agent_error(status, value)
    if (
        envelope
        and isinstance(value, dict)
        and "result" in value
        and "status" in value
        and value.keys() <= _ENVELOPE_KEYS
    ):
        return value["result"]
    return value


class EventStream(AsyncIterator[Any]):
    """The chunks of a streamed turn, decoded as they arrive.

    Reads the response's body piece by piece, only when asked for the next
    chunk (a reader that waits leaves the agent waiting: backpressure), and
    cuts it into events at blank lines (``\\n``, ``\\r\\n`` or ``\\r`` line
    ends, a line end split across pieces included); each event is parsed by
    :func:`~ppio_sandbox.agent_runtime.sse.iter_events`. Ends at ``event:
    done`` (or, for peers that send none, at a clean end of the body); an
    ``event: error`` raises the error it carries; a broken connection raises
    what ``on_broken`` makes of it (SandboxCrashedError). After ``done`` or
    ``error`` the end of the body is waited for (up to
    :data:`FINISH_TIMEOUT`), so the connection serves the next turn. Any
    other error, cancellation or :meth:`aclose` before the end closes the
    response's connection, so the agent's generator on the other side is
    cancelled.
    """

    def __init__(
        self,
        response: Response,
        on_broken: Callable[[BaseException], Awaitable[SandboxCrashedError]],
    ) -> None:
        self._response = response
        self._on_broken = on_broken
        self._buffer = b""  # received, not yet cut into events; line ends are \n
        self._cr = False  # the last piece ended with \r: the next may start with its \n
        self._finished = False
        self.last_event_id: str | None = None

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Any:
        if self._finished:
            raise StopAsyncIteration
        try:
            while True:
                event = await self._read_event()
                if event is None:
                    raise StopAsyncIteration
                if event.event == "message":
                    self.last_event_id = event.id
                    return _decode_data(event)
                if event.event == "done":
                    await self._response.finish(FINISH_TIMEOUT)
                    raise StopAsyncIteration
                if event.event == "error":
                    error = agent_error(500, _decode_data(event))
                    await self._response.finish(FINISH_TIMEOUT)
                    raise error
                # other event types (none defined yet) are skipped
        except TransportError as exc:
            await self.aclose()
            raise await self._on_broken(exc) from exc
        except BaseException:
            await self.aclose()
            raise

    async def _read_event(self) -> SSEEvent | None:
        """The next event, or None at the end of the body."""
        start = 0  # where a blank line may begin: the buffer before it has none
        while True:
            buffer = self._buffer
            end = buffer.find(b"\n\n", start)
            if end >= 0:
                self._buffer = buffer[end + 2 :]
                start = 0
                event = _parse_block(buffer[:end])
                if event is not None:  # a block of comments only carries no event
                    return event
                continue
            piece = await self._response.receive()
            if not piece:
                self._buffer = b""
                return _parse_block(buffer)
            if self._cr:
                piece = piece[1:] if piece[:1] == b"\n" else piece
            self._cr = piece[-1:] == b"\r"
            if b"\r" in piece:
                piece = piece.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            start = max(len(buffer) - 1, 0)
            self._buffer = buffer + piece

    async def aclose(self) -> None:
        """Stop reading and close the response (and with it the connection) unless it ended."""
        if self._finished:
            return
        self._finished = True
        if not self._response.complete:
            with anyio.CancelScope(shield=True):
                await self._response.aclose()


def _parse_block(block: bytes) -> SSEEvent | None:
    """The event of one block of lines (no blank line inside), if it has one."""
    if not block:
        return None
    lines = block.decode("utf-8", errors="replace").split("\n")
    return next(iter_events(iter(lines)), None)


def _decode_data(event: SSEEvent) -> Any:
    try:
        return event.json()
    except msgspec.DecodeError as exc:
        raise InvocationError(f"sandbox sent a malformed event: {event.data[:200]!r}") from exc
