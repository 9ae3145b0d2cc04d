"""The runtime's HTTP surface as a lean ASGI application.

No web framework on the hot path: the route is a dict lookup, headers are
read in one pass, bodies are decoded by module-level msgspec decoders, and
replies are written with precomputed header bytes.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.lowlevel

from ._handlers import describe_failure, is_cancellation
from .context import RequestContext, next_request_id
from .errors import (
    InvocationError,
    InvocationTimeoutError,
    MethodNotAllowedError,
    NotFoundError,
    PPIOAgentRuntimeError,
    RequestTooLargeError,
    ValidationError,
)
from .protocol import body_decoder, decode_payload, encode_json, encode_msgpack, wants_msgpack
from .sse import encode_event, encode_raw_event

if TYPE_CHECKING:
    from .app import PPIOAgentRuntimeApp

__all__ = ["RuntimeASGI"]

logger = logging.getLogger("ppio_sandbox.agent_runtime")

_JSON = b"application/json"
_MSGPACK = b"application/msgpack"
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_CLOSE_TIMEOUT = 5.0  # bound on a cancelled generator's cleanup

# Header names the runtime reads, mapped to a short key.
_WANTED = {
    b"content-type": "ct",
    b"content-length": "cl",
    b"accept": "accept",
    b"x-ppio-session-id": "sid",
    b"x-amzn-bedrock-agentcore-runtime-session-id": "sid2",
    b"x-ppio-request-id": "rid",
    b"origin": "origin",
    b"traceparent": "tp",
}


class _Reply(Exception):
    """Internal: answer with an error before the agent runs."""

    def __init__(self, error: PPIOAgentRuntimeError) -> None:
        self.error = error


class RuntimeASGI:
    """ASGI application serving ``/invocations``, ``/ping`` and ``/``."""

    def __init__(self, app: PPIOAgentRuntimeApp) -> None:
        self.app = app
        cfg = app.config
        self.max_body = cfg.max_request_size
        self.timeout = cfg.invocation_timeout
        self.cors_any = "*" in cfg.cors_origins
        self.cors_origins = {o.encode() for o in cfg.cors_origins}
        # Lives as long as the server (lifespan): hosts disconnect watchers.
        self._watchers: anyio.abc.TaskGroup | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            path = scope["path"]
            method = scope["method"]
            if path == "/invocations":
                if method == "POST":
                    await self._invocations(scope, receive, send)
                    return
                allowed = "POST"
            elif path == "/ping":
                if method in ("GET", "HEAD"):
                    await self._ping(scope, send)
                    return
                allowed = "GET, HEAD"
            elif path == "/":
                if method in ("GET", "HEAD"):
                    await self._info(scope, send)
                    return
                allowed = "GET, HEAD"
            else:
                err404 = NotFoundError(f"no route {path}")
                await self._error(scope, send, err404, _request_id_of(scope))
                return
            if method == "OPTIONS" and self.cors_origins:
                await self._preflight(scope, send, allowed)
                return
            err = MethodNotAllowedError(f"{method} not allowed on {path}; use {allowed}")
            allow = [(b"allow", allowed.encode())]
            await self._error(scope, send, err, _request_id_of(scope), allow)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    # -- /invocations -------------------------------------------------------

    async def _invocations(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        started = time.perf_counter()
        arrived_at = time.time()
        h: dict[str, bytes] = {}
        for name, value in scope["headers"]:
            key = _WANTED.get(name)
            if key is not None:
                h[key] = value
        rid_raw = h.get("rid")
        request_id = rid_raw.decode("latin-1") if rid_raw else next_request_id()
        try:
            payload = await self._read_payload(h, receive)
        except _Reply as reply:
            await self._error(scope, send, reply.error, request_id, close=True)
            return
        sid_raw = h.get("sid") or h.get("sid2")
        session_id = sid_raw.decode("latin-1") if sid_raw else None
        if session_id is None:
            body_sid = payload.get("session_id")
            session_id = body_sid if isinstance(body_sid, str) and body_sid else None
        metadata = payload.get("metadata")
        ctx = RequestContext(
            session_id=session_id,
            request_id=request_id,
            arrived_at=arrived_at,
            metadata=metadata if isinstance(metadata, dict) else {},
            state_store=self.app.states,
            raw_headers=scope["headers"],
            traceparent=tp.decode("latin-1") if (tp := h.get("tp")) else None,
        )
        debug_log = logger.isEnabledFor(logging.DEBUG)
        if debug_log:
            logger.debug(
                "invocation started",
                extra={"request_id": request_id, "session_id": session_id},
            )
        app = self.app
        app._begin()
        try:
            result: Any = None
            failure: PPIOAgentRuntimeError | None = None
            # The scope is entered first (an agent may open scopes of its own
            # before it first awaits); its timer is armed only if it suspends.
            gone: list[bool] = []
            with anyio.CancelScope() as scope_:
                try:
                    done, result = app.start_invoke(payload, ctx)
                    if not done:
                        if self.timeout:
                            scope_.deadline = anyio.current_time() + self.timeout
                        result = await self._await_unless_gone(result, receive, scope_, gone)
                except PPIOAgentRuntimeError as exc:
                    failure = exc
                except BaseException as exc:  # sys.exit() too: only this request fails
                    if is_cancellation(exc):
                        raise
                    failure = self._agent_failure(exc, request_id, session_id)
            if gone:
                logger.info(
                    "client disconnected; invocation cancelled",
                    extra={"request_id": request_id, "session_id": session_id},
                )
                return
            if scope_.cancelled_caught:
                failure = InvocationTimeoutError(f"invocation exceeded {self.timeout:g} s")
            if failure is not None:
                await self._error(scope, send, failure, request_id)
                return
            if hasattr(result, "__anext__"):
                deadline = (
                    started - time.perf_counter() + anyio.current_time() + self.timeout
                    if self.timeout
                    else float("inf")
                )
                await self._stream(scope, receive, send, result, ctx, started, deadline)
                return
            msgpack_reply = wants_msgpack(h.get("accept", b""))
            envelope = {
                "result": result,
                "status": "success",
                "duration": round(time.perf_counter() - started, 6),
                "metadata": {"request_id": request_id, "session_id": session_id},
            }
            try:
                body = encode_msgpack(envelope) if msgpack_reply else encode_json(envelope)
            except Exception as exc:  # e.g. a result msgspec cannot encode
                err = InvocationError(f"agent result could not be encoded: {exc}")
                await self._error(scope, send, err, request_id)
                return
            headers = [
                (b"content-type", _MSGPACK if msgpack_reply else _JSON),
                (b"content-length", b"%d" % len(body)),
                (b"x-ppio-request-id", request_id.encode("latin-1")),
            ]
            if session_id is not None:
                headers.append((b"x-ppio-session-id", session_id.encode("latin-1")))
            if self.cors_origins:
                self._cors(scope, headers)
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        finally:
            app._end()
            if debug_log:
                logger.debug(
                    "invocation finished in %.1f ms",
                    (time.perf_counter() - started) * 1000,
                    extra={"request_id": request_id, "session_id": session_id},
                )

    async def _await_unless_gone(
        self, pending: Any, receive: Any, scope: anyio.CancelScope, gone: list[bool]
    ) -> Any:
        """Await an invocation that suspended, cancelling it if the client leaves.

        Only suspended invocations pay for a watcher. It runs in the app's
        lifespan task group, not a nursery here: the agent's coroutine was
        started eagerly and may hold cancel scopes of its own, which must not
        end up outside a scope entered now.
        """
        watchers = self._watchers
        if watchers is None:  # served without lifespan: no disconnect detection
            return await pending
        watch = _DisconnectWatch(scope, gone)
        watchers.start_soon(watch.run, receive)
        try:
            return await pending
        finally:
            watch.stop()

    async def _read_payload(self, h: dict[str, bytes], receive: Any) -> dict[str, Any]:
        try:
            decode = body_decoder(h.get("ct", b""))  # a wrong type is refused unread
        except PPIOAgentRuntimeError as exc:
            raise _Reply(exc) from None
        declared = h.get("cl")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise _Reply(ValidationError("invalid Content-Length")) from None
            if size > self.max_body:
                if size <= _DISCARD_LIMIT:
                    await _discard_rest(receive, {"more_body": True})
                raise _Reply(self._too_large())
        body = await self._read_body(receive)
        try:
            return decode_payload(decode, body)
        except PPIOAgentRuntimeError as exc:
            raise _Reply(exc) from None

    async def _read_body(self, receive: Any) -> bytes:
        message = await receive()
        body: bytes = message.get("body", b"")
        if not message.get("more_body", False):
            if len(body) > self.max_body:
                raise _Reply(self._too_large())
            return body
        chunks = [body]
        size = len(body)
        while message.get("more_body", False):
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Reply(ValidationError("client disconnected while sending the body"))
            part = message.get("body", b"")
            size += len(part)
            if size > self.max_body:
                await _discard_rest(receive, message)
                raise _Reply(self._too_large())
            chunks.append(part)
        return b"".join(chunks)

    def _too_large(self) -> RequestTooLargeError:
        return RequestTooLargeError(
            f"request body exceeds max_request_size ({self.max_body} bytes)"
        )

    def _agent_failure(
        self, exc: BaseException, request_id: str, session_id: str | None
    ) -> InvocationError:
        message = describe_failure(exc)
        logger.error(
            "agent failed: %s",
            message,
            exc_info=exc,
            extra={"request_id": request_id, "session_id": session_id},
        )
        err = InvocationError(message)
        if self.app.config.debug:
            err.details["traceback"] = "".join(traceback.format_exception(exc))
        return err

    # -- streaming ----------------------------------------------------------

    async def _stream(
        self,
        scope: dict[str, Any],
        receive: Any,
        send: Any,
        chunks: AsyncIterator[Any],
        ctx: RequestContext,
        started: float,
        deadline: float,
    ) -> None:
        headers = [*_SSE_HEADERS, (b"x-ppio-request-id", ctx.request_id.encode("latin-1"))]
        if ctx.session_id is not None:
            headers.append((b"x-ppio-session-id", ctx.session_id.encode("latin-1")))
        if self.cors_origins:
            self._cors(scope, headers)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        seq = 0
        failure: PPIOAgentRuntimeError | None = None
        disconnected = False
        async with anyio.create_task_group() as tg:

            async def watch_disconnect() -> None:
                nonlocal disconnected
                # The body is fully read: the next message is the disconnect.
                while (await receive())["type"] != "http.disconnect":
                    pass
                disconnected = True
                tg.cancel_scope.cancel()

            tg.start_soon(watch_disconnect)
            try:
                with anyio.CancelScope(deadline=deadline) as budget:
                    try:
                        async for chunk in chunks:
                            seq += 1
                            event = encode_event(seq, chunk)
                            await send(
                                {"type": "http.response.body", "body": event, "more_body": True}
                            )
                            # hypercorn does not stop a generator whose client
                            # has gone: give the watcher a chance to run.
                            await anyio.lowlevel.checkpoint()
                    except PPIOAgentRuntimeError as exc:
                        failure = exc
                    except BaseException as exc:
                        if is_cancellation(exc):
                            raise
                        failure = self._agent_failure(exc, ctx.request_id, ctx.session_id)
                if budget.cancelled_caught:
                    failure = InvocationTimeoutError(f"invocation exceeded {self.timeout:g} s")
            finally:
                aclose = getattr(chunks, "aclose", None)
                if aclose is not None:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(_CLOSE_TIMEOUT):
                        await aclose()
                tg.cancel_scope.cancel()
        if disconnected:
            logger.info(
                "client disconnected after %d chunks; stream cancelled",
                seq,
                extra={"request_id": ctx.request_id, "session_id": ctx.session_id},
            )
            return
        seq += 1
        if failure is not None:
            tail = encode_raw_event(seq, encode_json(failure.to_envelope(ctx.request_id)), "error")
        else:
            done = {
                "request_id": ctx.request_id,
                "session_id": ctx.session_id,
                "chunks": seq - 1,
                "duration": round(time.perf_counter() - started, 6),
            }
            tail = encode_event(seq, done, "done")
        await send({"type": "http.response.body", "body": tail, "more_body": False})

    # -- /ping, / -----------------------------------------------------------

    async def _ping(self, scope: dict[str, Any], send: Any) -> None:
        response = await self.app.ping_response()
        await self._json(scope, send, 200, response.to_dict())

    async def _info(self, scope: dict[str, Any], send: Any) -> None:
        from . import __version__

        entry = self.app.entrypoint_handler
        info = {
            "service": "PPIO Agent Runtime",
            "version": __version__,
            "entrypoint": entry.name if entry else None,
            "streaming": entry.is_streaming if entry else None,
            "endpoints": {"invoke": "POST /invocations", "health": "GET /ping"},
        }
        await self._json(scope, send, 200, info)

    # -- plumbing -----------------------------------------------------------

    async def _json(
        self,
        scope: dict[str, Any],
        send: Any,
        status: int,
        value: Any,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        body = encode_json(value)
        headers = [(b"content-type", _JSON), (b"content-length", b"%d" % len(body))]
        if extra_headers:
            headers.extend(extra_headers)
        if self.cors_origins:
            self._cors(scope, headers)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        body_out = b"" if scope["method"] == "HEAD" else body
        await send({"type": "http.response.body", "body": body_out})

    async def _error(
        self,
        scope: dict[str, Any],
        send: Any,
        error: PPIOAgentRuntimeError,
        request_id: str | None,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
        close: bool = False,
    ) -> None:
        headers = list(extra_headers or [])
        if request_id:
            headers.append((b"x-ppio-request-id", request_id.encode("latin-1")))
        if close:
            # The body may be partly unread: do not reuse the connection.
            headers.append((b"connection", b"close"))
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            headers.append((b"retry-after", b"%d" % max(1, round(retry_after))))
        if error.status_code >= 500:
            logger.warning(
                "%s: %s", error.error_type, error.message, extra={"request_id": request_id}
            )
        await self._json(scope, send, error.status_code, error.to_envelope(request_id), headers)

    def _cors(self, scope: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> None:
        origin = next((v for k, v in scope["headers"] if k == b"origin"), None)
        if origin is None:
            return
        if self.cors_any:
            headers.append((b"access-control-allow-origin", b"*"))
        elif origin in self.cors_origins:
            headers.append((b"access-control-allow-origin", origin))
            headers.append((b"vary", b"Origin"))
        headers.append((b"access-control-expose-headers", b"x-ppio-request-id, x-ppio-session-id"))

    async def _preflight(self, scope: dict[str, Any], send: Any, allowed: str) -> None:
        headers = [
            (b"access-control-allow-methods", (allowed + ", OPTIONS").encode()),
            (
                b"access-control-allow-headers",
                b"content-type, authorization, x-ppio-session-id, x-ppio-request-id, "
                b"x-amzn-bedrock-agentcore-runtime-session-id, idempotency-key",
            ),
            (b"access-control-max-age", b"600"),
            (b"content-length", b"0"),
        ]
        self._cors(scope, headers)
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def _lifespan(self, receive: Any, send: Any) -> None:
        async with anyio.create_task_group() as tg:
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    if self.app.entrypoint_handler is None:
                        await send(
                            {
                                "type": "lifespan.startup.failed",
                                "message": "no entrypoint registered: use @app.entrypoint",
                            }
                        )
                        return
                    self._watchers = tg
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    self._watchers = None
                    tg.cancel_scope.cancel()
                    await send({"type": "lifespan.shutdown.complete"})
                    return


_DISCARD_LIMIT = 16 * 1024 * 1024
_DISCARD_SECONDS = 5.0


async def _discard_rest(receive: Any, message: dict[str, Any]) -> None:
    """Read and drop the rest of an oversized body before answering 413.

    Closing a socket with unread data makes the kernel reset the connection,
    and the client may then never see the 413. Bounded in bytes and time.
    """
    dropped = 0
    with anyio.move_on_after(_DISCARD_SECONDS):
        while message.get("more_body", False) and dropped < _DISCARD_LIMIT:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            dropped += len(message.get("body", b""))


class _DisconnectWatch:
    """Cancels an invocation's scope when its client disconnects; stopped when it ends."""

    __slots__ = ("finished", "gone", "scope", "target")

    def __init__(self, target: anyio.CancelScope, gone: list[bool]) -> None:
        self.target = target
        self.gone = gone
        self.finished = False
        self.scope: anyio.CancelScope | None = None

    async def run(self, receive: Any) -> None:
        if self.finished:
            return
        with anyio.CancelScope() as self.scope:
            while (await receive())["type"] != "http.disconnect":
                pass
            if not self.finished:
                self.gone.append(True)
                self.target.cancel()

    def stop(self) -> None:
        self.finished = True
        if self.scope is not None:
            self.scope.cancel()


def _request_id_of(scope: dict[str, Any]) -> str:
    """The caller's request id, or a new one (error paths only)."""
    for name, value in scope["headers"]:
        if name == b"x-ppio-request-id":
            return str(value.decode("latin-1"))
    return next_request_id()
