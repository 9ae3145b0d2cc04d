"""The invocation hot path: a lean ASGI handler in front of Quart.

``POST /v1/sessions/{id}/invocations`` and ``POST /v1/agents/{id}/invocations``
skip the web framework: the body is already read and authenticated by the
front door (``frontend.py``); this module admits the turn to the session's
actor and writes the reply (JSON, msgpack, or Server-Sent Events).

Headers: ``Idempotency-Key`` (generated when absent and echoed),
``X-PPIO-Strategy`` (enqueue | reject | interrupt; also ``?strategy=``),
``Last-Event-ID`` (resume a stream after that event: 404 when the session no
longer has the turn with that key, rather than running it again), ``X-PPIO-Session-Id``
(the AgentCore-style route: which session to use or create).
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import anyio
import anyio.lowlevel

from ppio_sandbox.agent_runtime.context import next_request_id
from ppio_sandbox.agent_runtime.errors import (
    NotFoundError,
    PPIOAgentRuntimeError,
    ValidationError,
)
from ppio_sandbox.agent_runtime.protocol import encode_json
from ppio_sandbox.agent_runtime.sse import encode_event, encode_raw_event

from .actor import Session, read_batches, wait_started
from .session_core import Admission, Strategy, Turn
from .wire import decode_object, encode_reply

if TYPE_CHECKING:
    from .host import Orchestrator

__all__ = ["InvocationHandler", "Send"]

logger = logging.getLogger("ppio_sandbox.orchestrator")

Send = Any
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_WANTED = {
    b"content-type": "ct",
    b"accept": "accept",
    b"idempotency-key": "key",
    b"x-ppio-strategy": "strategy",
    b"last-event-id": "last",
    b"x-ppio-session-id": "sid",
    b"x-amzn-bedrock-agentcore-runtime-session-id": "sid2",
    b"x-ppio-request-id": "rid",
}


class InvocationHandler:
    """Serves invocations for one orchestrator."""

    def __init__(self, host: Orchestrator, error_reply: Any) -> None:
        self.host = host
        self.error_reply = error_reply

    async def __call__(
        self,
        scope: dict[str, Any],
        receive: Any,
        send: Send,
        *,
        tenant: str,
        kind: str,
        target: str,
        body: bytes,
    ) -> None:
        h: dict[str, bytes] = {}
        for name, value in scope["headers"]:
            key = _WANTED.get(name)
            if key is not None:
                h[key] = value
        rid = h.get("rid")
        request_id = rid.decode("latin-1") if rid else next_request_id()
        try:
            payload = decode_object(h.get("ct", b""), body)
            strategy_raw = h.get("strategy")
            if strategy_raw is None and scope.get("query_string"):
                found = parse_qs(scope["query_string"].decode("latin-1")).get("strategy")
                strategy_raw = found[0].encode() if found else None
            strategy = Strategy.parse(strategy_raw.decode("latin-1") if strategy_raw else None)
            last = h.get("last")
            start = _parse_last_event_id(last) if last else 0
            host = self.host
            if kind == "sessions":
                session = await host.open_session(tenant, target)
            else:
                sid_raw = h.get("sid") or h.get("sid2")
                sid = sid_raw.decode("latin-1") if sid_raw else None
                session = await host.get_or_create_session(tenant, target, sid)
            key_raw = h.get("key")
            key = key_raw.decode("latin-1") if key_raw else next_request_id()
            if start and not session.core.knows(key, host.clock()):
                # Admitting it would run the turn again and splice two runs' events.
                raise NotFoundError(
                    f"cannot resume after event {start}: session {session.session_id} has no "
                    f"turn with Idempotency-Key {key!r} (it ended too long ago, or was lost "
                    f"with its sandbox); invoke again with a new key"
                )
            admission, turn = host.submit(
                session,
                payload,
                key=key,
                body_hash=hashlib.sha256(body).digest(),
                request_id=request_id,
                strategy=strategy,
                inline=True,
            )
        except PPIOAgentRuntimeError as exc:
            await self.error_reply(send, exc, request_id, h.get("accept", b""))
            return
        headers = [
            (b"x-ppio-request-id", request_id.encode("latin-1")),
            (b"x-ppio-session-id", session.session_id.encode("latin-1")),
            (b"idempotency-key", key.encode("latin-1")),
        ]
        if admission is Admission.REPLAY:
            headers.append((b"idempotent-replayed", b"true"))
        turn.readers += 1
        streaming = False
        try:
            if admission is Admission.RUN:  # an idle session: no hand-off to its actor
                await host.run_inline(session, turn)
            await wait_started(turn)
            streaming = turn.streaming
            if streaming:
                await self._stream(scope, receive, send, turn, headers, start, session)
            else:
                await self._reply(send, turn, headers, h.get("accept", b""), session)
        finally:
            if streaming:
                host.reader_left(session, turn)
            else:
                turn.readers -= 1

    async def _reply(
        self,
        send: Send,
        turn: Turn,
        headers: list[tuple[bytes, bytes]],
        accept: bytes,
        session: Session,
    ) -> None:
        sid = session.session_id
        error = turn.error
        if error is None:
            try:
                await self.host.durable(session, turn)  # --durability turn: stored before sent
            except PPIOAgentRuntimeError as exc:
                error = exc
        if error is not None:
            await self.error_reply(send, error, turn.request_id, accept, headers)
            return
        envelope = {
            "result": turn.result,
            "status": "success",
            "duration": round((turn.finished_at or 0.0) - (turn.started_at or 0.0), 6),
            "metadata": {"request_id": turn.request_id, "session_id": sid},
        }
        body, ctype = encode_reply(envelope, accept)
        headers += [(b"content-type", ctype), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _stream(
        self,
        scope: dict[str, Any],
        receive: Any,
        send: Send,
        turn: Turn,
        headers: list[tuple[bytes, bytes]],
        start: int,
        session: Session,
    ) -> None:
        sid = session.session_id
        await send(
            {"type": "http.response.start", "status": 200, "headers": [*_SSE_HEADERS, *headers]}
        )
        seq = start
        async with anyio.create_task_group() as tg:

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(watch_disconnect)
            async for first, chunks in read_batches(turn, start):
                body = b"".join([encode_event(first + i, c) for i, c in enumerate(chunks)])
                seq = first + len(chunks) - 1
                await send({"type": "http.response.body", "body": body, "more_body": True})
                await anyio.lowlevel.checkpoint()
            error = turn.error
            if error is None:
                try:
                    await self.host.durable(session, turn)
                except PPIOAgentRuntimeError as exc:
                    error = exc
            if error is not None:
                data = encode_json(error.to_envelope(turn.request_id))
                tail = encode_raw_event(seq + 1, data, "error")
            else:
                done = {
                    "request_id": turn.request_id,
                    "session_id": sid,
                    "chunks": len(turn.events),
                    "duration": round((turn.finished_at or 0.0) - (turn.started_at or 0.0), 6),
                }
                tail = encode_event(seq + 1, done, "done")
            await send({"type": "http.response.body", "body": tail, "more_body": False})
            tg.cancel_scope.cancel()


def _parse_last_event_id(raw: bytes) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValidationError("Last-Event-ID must be the integer id of an event") from None
    if value < 0:
        raise ValidationError("Last-Event-ID must not be negative")
    return value
