"""Reading a sandbox's HTTP replies: the JSON envelope and live SSE streams."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import httpx
import msgspec

from ppio_sandbox.agent_runtime.errors import (
    InvocationError,
    PPIOAgentRuntimeError,
    SandboxCrashedError,
    error_from_envelope,
)
from ppio_sandbox.agent_runtime.protocol import decode_json
from ppio_sandbox.agent_runtime.sse import SSEEvent, iter_events

__all__ = ["EventStream", "agent_error", "decode_reply"]

_ENVELOPE_KEYS = frozenset({"result", "status", "duration", "metadata"})


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

    Ends at ``event: done`` (or, for peers that send none, at a clean end of
    the body); an ``event: error`` raises the error it carries; a broken
    connection raises what ``on_broken`` makes of it (SandboxCrashedError).
    Any error, cancellation or :meth:`aclose` closes the HTTP response, so
    the agent's generator on the other side is cancelled.
    """

    def __init__(
        self,
        response: httpx.Response,
        on_broken: Callable[[BaseException], Awaitable[SandboxCrashedError]],
    ) -> None:
        self._response = response
        self._lines = response.aiter_lines()
        self._on_broken = on_broken
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
                if event is None or event.event == "done":
                    raise StopAsyncIteration
                if event.event == "message":
                    self.last_event_id = event.id
                    return _decode_data(event)
                if event.event == "error":
                    raise agent_error(500, _decode_data(event))
                # other event types (none defined yet) are skipped
        except (httpx.TransportError, httpx.StreamError) as exc:
            await self.aclose()
            raise await self._on_broken(exc) from exc
        except BaseException:
            await self.aclose()
            raise

    async def _read_event(self) -> SSEEvent | None:
        block: list[str] = []
        async for line in self._lines:
            if line:
                block.append(line)
                continue
            events = list(iter_events(iter(block)))
            block = []
            if events:  # a block of comments only carries no event
                return events[0]
        events = list(iter_events(iter(block)))
        return events[0] if events else None

    async def aclose(self) -> None:
        """Stop reading and close the response (and with it the connection)."""
        if self._finished:
            return
        self._finished = True
        with anyio.CancelScope(shield=True):
            try:
                close_lines = getattr(self._lines, "aclose", None)
                if close_lines is not None:
                    with contextlib.suppress(RuntimeError):  # running in another task
                        await close_lines()
            finally:
                await self._response.aclose()


def _decode_data(event: SSEEvent) -> Any:
    try:
        return event.json()
    except msgspec.DecodeError as exc:
        raise InvocationError(f"sandbox sent a malformed event: {event.data[:200]!r}") from exc
