"""Bodies in and out of the orchestrator's API: JSON or msgpack, and the views.

Request bodies may be JSON or msgpack (by ``Content-Type``); replies are
msgpack when ``Accept`` names ``application/msgpack``, JSON otherwise.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ppio_sandbox.agent_runtime.errors import UnsupportedMediaTypeError, ValidationError
from ppio_sandbox.agent_runtime.protocol import (
    decode_json,
    decode_msgpack,
    encode_json,
    encode_msgpack,
)

from .actor import Session

__all__ = ["decode_body", "encode_reply", "session_view", "template_view", "wants_msgpack"]

_MSGPACK_TYPES = (b"application/msgpack", b"application/x-msgpack", b"application/vnd.msgpack")


def decode_body(content_type: bytes, body: bytes, *, allow_empty: bool = False) -> Any:
    """Decode a JSON or msgpack body; 400/415 with a clear message otherwise."""
    ctype = content_type.split(b";", 1)[0].strip().lower()
    if not body:
        if allow_empty:
            return {}
        raise ValidationError('empty body; send a JSON object such as {"prompt": "hi"}')
    if ctype in _MSGPACK_TYPES:
        decode = decode_msgpack
    elif ctype in (b"", b"application/json") or (
        ctype.startswith(b"application/") and ctype.endswith(b"+json")
    ):
        decode = decode_json
    else:
        raise UnsupportedMediaTypeError(
            f"unsupported Content-Type {ctype.decode('latin-1')!r}; "
            "send application/json or application/msgpack"
        )
    try:
        return decode(body)
    except UnicodeDecodeError:
        raise ValidationError("body is not valid UTF-8") from None
    except RecursionError:
        raise ValidationError("body is nested too deeply") from None
    except (msgspec.DecodeError, ValueError) as exc:
        raise ValidationError(f"malformed body: {exc}") from None


def decode_object(content_type: bytes, body: bytes, *, allow_empty: bool = False) -> dict[str, Any]:
    """Like :func:`decode_body`, and the value must be an object."""
    value = decode_body(content_type, body, allow_empty=allow_empty)
    if isinstance(value, str):
        return {"prompt": value}
    if not isinstance(value, dict):
        raise ValidationError("body must be a JSON object")
    return value


def wants_msgpack(accept: bytes) -> bool:
    return b"application/msgpack" in accept


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
    }
    if core.end_reason:
        view["reason"] = core.end_reason
    if session.sandbox is not None:
        view["sandbox"] = session.sandbox.describe()
    return view


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
