"""Bodies in and out of the orchestrator's API: JSON or msgpack, and the views.

Request bodies may be JSON or msgpack (by ``Content-Type``); replies are
msgpack when ``Accept`` names ``application/msgpack``, JSON otherwise.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ppio_sandbox.agent_runtime.protocol import (
    body_decoder,
    decode_payload,
    encode_json,
    encode_msgpack,
    wants_msgpack,
)

from .actor import Session
from .state_store import SessionRecord

__all__ = ["decode_object", "encode_reply", "record_view", "session_view", "template_view"]


def decode_object(content_type: bytes, body: bytes, *, allow_empty: bool = False) -> dict[str, Any]:
    """Decode a JSON or msgpack object body (400/415 with a clear message otherwise).

    The same rules as the agent runtime's ``/invocations``
    (:func:`~ppio_sandbox.agent_runtime.protocol.decode_payload`);
    ``allow_empty`` reads an empty body as ``{}``.
    """
    decode = body_decoder(content_type)
    if not body and allow_empty:
        return {}
    return decode_payload(decode, body)


def encode_reply(value: Any, accept: bytes) -> tuple[bytes, bytes]:
    """``(body, content_type)`` in the format the caller accepts."""
    if wants_msgpack(accept):
        return encode_msgpack(value), b"application/msgpack"
    return encode_json(value), b"application/json"


def session_view(session: Session, *, wall_offset: float) -> dict[str, Any]:
    """The API's view of a session (times as epoch seconds)."""
    core = session.core
    view: dict[str, Any] = {
        "session_id": core.session_id,
        "template_id": session.template_id,
        "status": core.state.value,
        "created_at": round(core.created_at + wall_offset, 3),
        "last_activity": round(core.last_activity + wall_offset, 3),
        "expires_at": round(core.deadline() + wall_offset, 3),
        "timeout_seconds": core.timeout_seconds,
        "turns": {"ok": core.turns_ok, "failed": core.turns_failed, "queued": core.queued},
        "restarts": core.restarts,
        "metadata": session.metadata or {},
        "resident": True,
    }
    if core.end_reason:
        view["reason"] = core.end_reason
    if session.sandbox is not None:
        view["sandbox"] = session.sandbox.describe()
    return view


def record_view(record: SessionRecord) -> dict[str, Any]:
    """The API's view of a dormant session: checkpointed, not in memory on any node.

    Its next call brings it back (with a fresh sandbox), so it is ``ready``.
    """
    return {
        "session_id": record.session_id,
        "template_id": record.template_id,
        "status": "paused" if record.paused else "ready",
        "created_at": round(record.created_at, 3),
        "last_activity": round(record.last_activity, 3),
        "expires_at": round(record.last_activity + record.timeout_seconds, 3),
        "timeout_seconds": record.timeout_seconds,
        "turns": {"ok": record.turns_ok, "failed": record.turns_failed, "queued": 0},
        "restarts": 0,
        "metadata": record.metadata or {},
        "resident": False,
    }


def template_view(template: Any) -> dict[str, Any]:
    """The API's view of a template record."""
    spec = template.spec
    return {
        "template_id": template.id,
        "name": template.name,
        "version": template.version,
        "phase": template.phase,
        "digest": template.digest,
        "created_at": template.created_at,
        "updated_at": template.updated_at,
        "error": template.error,
        "build_log": template.build_log,
        "spec": msgspec.to_builtins(spec),
    }
