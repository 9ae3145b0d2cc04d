"""Running a prepared invocation: a whole reply, or a live stream of chunks.

The orchestrator answers a turn with a JSON (or msgpack) envelope, or with
Server-Sent Events when the agent streams: ``id: <seq>`` / ``data: <json>``
per chunk, then ``event: done`` or ``event: error`` with the error envelope.
Either caller copes with either answer: :func:`invoke` collects a stream's
chunks into ``InvocationResponse.result`` (a list), and an
:class:`InvocationStream` over a plain reply yields its result once.

A stream whose connection breaks after the reply started (a transport
error, or a body that ends without ``done``/``error``) is resumed: the same
body is sent again with the same ``Idempotency-Key`` and ``Last-Event-ID``
set to the last event received, and the server (which keeps a turn's events
with its idempotency record) rejoins the running turn or replays the
finished one from the next event. Each resumption is a retry of the call:
it counts against ``max_retries``, the retry budget and the deadline.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, NoReturn, Self

import anyio
import httpx

from ppio_sandbox.agent_runtime.errors import (
    InvocationTimeoutError,
    PPIOAgentRuntimeError,
    ServiceUnavailableError,
    error_from_envelope,
)
from ppio_sandbox.agent_runtime.protocol import (
    HEADER_REQUEST_ID,
    HEADER_SESSION_ID,
    InvocationResponse,
)
from ppio_sandbox.agent_runtime.sse import iter_events

from ._connection import ApiConnection, decode_reply, is_event_stream
from ._models import PreparedInvocation, convert
from ._retry import RetryState

__all__ = ["InvocationStream", "invoke", "invoke_runtime", "response_from_reply"]

logger = logging.getLogger("ppio_sandbox.client")

_END = object()


def response_from_reply(value: Any, response: httpx.Response) -> InvocationResponse:
    """An :class:`InvocationResponse` from a decoded reply (an envelope, or a bare value)."""
    if isinstance(value, dict) and "result" in value and "status" in value:
        return convert(value, InvocationResponse)
    metadata = {
        "request_id": response.headers.get(HEADER_REQUEST_ID),
        "session_id": response.headers.get(HEADER_SESSION_ID),
    }
    return InvocationResponse(result=value, metadata=metadata)


async def invoke(conn: ApiConnection, inv: PreparedInvocation) -> InvocationResponse:
    """Send ``inv`` and wait for the whole reply, within its deadline."""
    stream = InvocationStream(conn, inv)
    with anyio.CancelScope(deadline=inv.deadline):
        try:
            response = await stream.open()
            if stream.streaming:
                chunks = [chunk async for chunk in stream]
                summary = stream.summary or {}
                metadata = {
                    "request_id": summary.get("request_id", stream.request_id),
                    "session_id": summary.get("session_id", stream.session_id),
                    "chunks": len(chunks),
                }
                duration = summary.get("duration", 0.0)
                return InvocationResponse(result=chunks, duration=duration, metadata=metadata)
            return response_from_reply(stream.reply, response)
        finally:
            await stream.aclose()
    raise InvocationTimeoutError(f"POST {inv.path}: no reply within {inv.timeout:g} s")


async def invoke_runtime(conn: ApiConnection, inv: PreparedInvocation) -> dict[str, Any]:
    """Send ``inv`` and answer as AgentCore's ``invoke_agent_runtime`` does.

    ``response`` is the agent's result, or the open :class:`InvocationStream`
    when the agent streams (``contentType`` ``text/event-stream``).
    """
    stream = InvocationStream(conn, inv)
    response = await stream.open()
    out: dict[str, Any] = {
        "runtimeSessionId": stream.session_id or inv.headers.get(HEADER_SESSION_ID),
        "contentType": stream.content_type.split(";")[0].strip(),
        "statusCode": response.status_code,
        "requestId": stream.request_id,
    }
    if stream.streaming:
        out["response"] = stream
    else:
        out["response"] = response_from_reply(stream.reply, response).result
        await stream.aclose()
    return out


async def _drain(lines: AsyncIterator[str]) -> None:
    """Read to the end of the body (it ends after the last event).

    Exhausting httpx's chain of async generators lets each finish now; closed
    half-way, they are left for the garbage collector (a ResourceWarning on trio).
    """
    try:
        async for _ in lines:
            pass
    except httpx.TransportError:
        pass  # the stream already said all it had to say


class InvocationStream:
    """The chunks of one invocation as they arrive: an async iterator.

    Use it with ``async for``; leaving early, close it (``aclose()``, or
    ``async with``) so its connection is released. The deadline covers the
    whole stream. A server error, whether before the first chunk or
    mid-stream (``event: error``), is raised as the server's exception class.
    A broken connection is resumed after the last chunk received (see the
    module's docstring): no chunk is lost or repeated.

    >>> async def main(client):  # doctest: +SKIP
    ...     async with client.stream_agent("assistant", "hello") as chunks:
    ...         async for chunk in chunks:
    ...             print(chunk)

    ``last_event_id`` is the id of the last chunk received (what a resumed
    stream sends as ``Last-Event-ID``); ``resumes`` how many times the
    stream was resumed; ``summary`` the ``done`` event's data once the
    stream ended normally.
    """

    def __init__(
        self,
        conn: ApiConnection,
        inv: PreparedInvocation,
        *,
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._conn = conn
        self._inv = inv
        self._on_close = on_close
        self._response: httpx.Response | None = None
        self._lines: AsyncIterator[str] | None = None
        self._pending: list[Any] = []
        self._closed = False
        self._retries: RetryState | None = None
        self._seq = 0  # the number of the last chunk yielded (event ids count from 1)
        self.streaming = False
        self.reply: Any = None
        self.last_event_id: str | None = None
        self.resumes = 0
        self.summary: dict[str, Any] | None = None
        self.request_id: str | None = None
        self.session_id: str | None = None

    @property
    def idempotency_key(self) -> str:
        return self._inv.key

    @property
    def content_type(self) -> str:
        if self._response is None:
            return ""
        ctype: str = self._response.headers.get("content-type", "")
        return ctype

    async def open(self) -> httpx.Response:
        """Send the request (once); raises the server's error if it refuses."""
        if self._response is not None:
            return self._response
        if self._closed:
            raise RuntimeError("this stream is closed")
        try:
            with anyio.CancelScope(deadline=self._inv.deadline):
                self._retries = self._conn.retry_state(idempotent=True, deadline=self._inv.deadline)
                response = await self._conn.open_invocation(self._inv, retries=self._retries)
                self._attach(response)
                self.request_id = response.headers.get(HEADER_REQUEST_ID)
                self.session_id = response.headers.get(HEADER_SESSION_ID)
                self.streaming = is_event_stream(response)
                if not self.streaming:
                    await response.aread()
                    self.reply = decode_reply(response)
                    self._pending.append(response_from_reply(self.reply, response).result)
                return response
            self._timed_out()
        except BaseException:
            await self.aclose()
            raise

    def _attach(self, response: httpx.Response) -> None:
        self._response = response
        self._lines = response.aiter_lines() if is_event_stream(response) else None

    def _timed_out(self) -> NoReturn:
        raise InvocationTimeoutError(
            f"POST {self._inv.path}: no reply within {self._inv.timeout:g} s"
        )

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Any:
        if self._response is None and not self._closed:
            await self.open()
        if self._pending:
            item = self._pending.pop(0)
        elif self._closed or self._lines is None:
            item = _END
        else:
            try:
                with anyio.CancelScope(deadline=self._inv.deadline) as scope:
                    item = await self._next_chunk()
                if scope.cancelled_caught:
                    self._timed_out()
            except BaseException:
                await self.aclose()
                raise
        if item is _END:
            await self.aclose()
            raise StopAsyncIteration
        return item

    async def _next_chunk(self) -> Any:
        buffer: list[str] = []
        while True:
            assert self._lines is not None
            try:
                line = await anext(self._lines)
            except (StopAsyncIteration, httpx.TransportError) as exc:
                # An event is only complete once its blank line arrived: a
                # half-received one is dropped here and sent again on resuming.
                buffer.clear()
                await self._resume(exc if isinstance(exc, httpx.TransportError) else None)
                continue
            if line:
                buffer.append(line)
                continue
            if not buffer:
                continue
            event = next(iter_events(iter([*buffer, ""])))
            buffer.clear()
            if event.event == "message":
                if self._already_seen(event.id):
                    continue
                self.last_event_id = event.id
                return event.json()
            if event.event == "done":
                value = event.json()
                self.summary = value if isinstance(value, dict) else {}
                await _drain(self._lines)
                return _END
            if event.event == "error":
                await _drain(self._lines)
                raise self._stream_error(event.json())

    def _already_seen(self, ident: str | None) -> bool:
        """True for a chunk yielded before a resumption; raises if chunks were skipped."""
        if ident is None or not ident.isdigit():
            return False  # not numbered: nothing to check
        seq = int(ident)
        if seq <= self._seq:
            return True
        if self.resumes and seq > self._seq + 1:
            raise ServiceUnavailableError(
                f"the stream of POST {self._inv.path} was resumed after event {self._seq} "
                f"but went on at event {seq}: chunks were lost"
            )
        self._seq = seq
        return False

    async def _resume(self, cause: httpx.TransportError | None) -> None:
        """Reconnect after the last event received, or raise why the stream ended."""
        await self._release()
        retries = self._retries
        wait = retries.next_wait(what="a broken stream") if retries is not None else None
        if wait is None:
            if cause is not None:
                self._conn.raise_transport_error(cause)
            raise ServiceUnavailableError(
                f"the stream of POST {self._inv.path} ended before its end event "
                f"(last event id {self.last_event_id})"
            )
        logger.debug(
            "the stream of POST %s broke after event %s (%s); resuming in %.3f s",
            self._inv.path,
            self.last_event_id,
            cause or "the body ended early",
            wait,
        )
        await anyio.sleep(wait)
        response = await self._conn.open_invocation(
            self._inv, retries=retries, last_event_id=self.last_event_id
        )
        self.resumes += 1
        self._attach(response)
        if self._lines is None:
            await response.aclose()
            raise ServiceUnavailableError(
                f"the stream of POST {self._inv.path} could not be resumed: "
                f"the server answered with a plain {response.status_code} reply"
            )

    def _stream_error(self, envelope: Any) -> PPIOAgentRuntimeError:
        exc = error_from_envelope(500, envelope)
        if exc.request_id is None:
            exc.request_id = self.request_id
        return exc

    async def _release(self) -> None:
        """Close the current response (shielded, bounded)."""
        response, lines = self._response, self._lines
        self._lines = None
        with anyio.CancelScope(shield=True):
            if response is not None:
                await response.aclose()
            if lines is not None:
                # Closed half-way: let httpx's generators run into the closed
                # stream and finish now, rather than in the garbage collector.
                with anyio.move_on_after(1), contextlib.suppress(Exception):
                    await _drain(lines)

    async def aclose(self) -> None:
        """Release the connection (and run the close hook, e.g. end a one-shot session)."""
        if self._closed:
            return
        self._closed = True
        await self._release()
        if self._on_close is not None:
            with anyio.CancelScope(shield=True):
                await self._on_close()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
