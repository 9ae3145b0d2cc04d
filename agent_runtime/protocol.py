"""The wire protocol, defined once and used by the runtime, orchestrator and client.

Messages are msgspec Structs; encoders and decoders are module-level
singletons (never built per request). Header names are lower-case bytes for
ASGI and ``str`` for httpx.
"""

from __future__ import annotations

import enum
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from .errors import UnsupportedMediaTypeError, ValidationError

__all__ = [
    "CONTENT_JSON",
    "CONTENT_MSGPACK",
    "CONTENT_SSE",
    "HEADER_AGENTCORE_SESSION_ID",
    "HEADER_IDEMPOTENCY_KEY",
    "HEADER_LAST_EVENT_ID",
    "HEADER_REQUEST_ID",
    "HEADER_SESSION_ID",
    "InvocationRequest",
    "InvocationResponse",
    "PingResponse",
    "PingStatus",
    "body_decoder",
    "decode_json",
    "decode_msgpack",
    "decode_payload",
    "encode_json",
    "encode_msgpack",
    "wants_msgpack",
]

CONTENT_JSON = "application/json"
CONTENT_MSGPACK = "application/msgpack"
CONTENT_SSE = "text/event-stream"

HEADER_SESSION_ID = "X-PPIO-Session-Id"
HEADER_AGENTCORE_SESSION_ID = "X-Amzn-Bedrock-AgentCore-Runtime-Session-Id"
HEADER_REQUEST_ID = "X-PPIO-Request-Id"
HEADER_IDEMPOTENCY_KEY = "Idempotency-Key"
HEADER_LAST_EVENT_ID = "Last-Event-ID"


def _enc_hook(obj: Any) -> Any:
    """Encode what msgspec does not know natively, as an agent would expect."""
    for attr in ("model_dump", "to_dict", "dict"):  # pydantic v2, common, pydantic v1
        method = getattr(obj, attr, None)
        if callable(method):
            return method()
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    return str(obj)


_json_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)
_json_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder()
_msgpack_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_msgpack_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder()

encode_json = _json_encoder.encode
decode_json = _json_decoder.decode
encode_msgpack = _msgpack_encoder.encode
decode_msgpack = _msgpack_decoder.decode

_MSGPACK_TYPES = (b"application/msgpack", b"application/x-msgpack", b"application/vnd.msgpack")


def wants_msgpack(accept: bytes) -> bool:
    """True when an ``Accept`` header value asks for a msgpack reply."""
    return b"application/msgpack" in accept or b"application/x-msgpack" in accept


def body_decoder(content_type: bytes) -> Callable[[bytes], Any]:
    """The decoder for a request's ``Content-Type`` header value.

    JSON for none, ``application/json`` or ``application/*+json``; msgpack for
    its three usual names; anything else is a 415, raised before the body is
    read.
    """
    ctype = content_type.split(b";", 1)[0].strip().lower()
    if ctype in (b"", b"application/json") or (
        ctype.startswith(b"application/") and ctype.endswith(b"+json")
    ):
        return decode_json
    if ctype in _MSGPACK_TYPES:
        return decode_msgpack
    raise UnsupportedMediaTypeError(
        f"unsupported Content-Type {ctype.decode('latin-1')!r}; "
        "send application/json or application/msgpack"
    )


# Every integer outside msgpack's range has at least 19 digits.
_LONG_DIGITS = re.compile(rb"[0-9]{19}")


def decode_payload(decode: Callable[[bytes], Any], body: bytes) -> dict[str, Any]:
    """An invocation body as the dict an agent receives; 400 with a clear reason otherwise.

    A bare JSON string is taken as the prompt (``curl -d '"hi"'`` works);
    arrays, numbers, null and booleans are refused. So are JSON integers
    outside ``-2**63 .. 2**64 - 1``: msgpack cannot carry them, so a reply,
    a session view or a checkpoint holding one would fail later (a 500).
    """
    if not body:
        raise ValidationError('empty body; send a JSON object such as {"prompt": "hi"}')
    try:
        payload = decode(body)
        if decode is decode_json and _LONG_DIGITS.search(body):
            encode_msgpack(payload)  # the precise check, only for bodies with long numbers
    except UnicodeDecodeError:
        raise ValidationError("body is not valid UTF-8") from None
    except RecursionError:
        raise ValidationError("body is nested too deeply") from None
    except OverflowError:
        where = (_huge_int_at(payload) or "a value")[:200]
        raise ValidationError(
            f"{where} is an integer outside -2**63 .. 2**64-1, which msgpack cannot carry; "
            "send it as a string"
        ) from None
    except (msgspec.DecodeError, ValueError) as exc:
        raise ValidationError(f"malformed body: {exc}") from None
    if isinstance(payload, dict):
        return payload
    if isinstance(payload, str):
        return {"prompt": payload}
    raise ValidationError(
        f"body must be a JSON object (or a string, taken as the prompt), not {_json_kind(payload)}"
    )


def _huge_int_at(value: Any) -> str | None:
    """Where in a decoded body the first integer msgpack cannot carry is (``a.b[2]``)."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, int) and not isinstance(item, bool):
            if not -(2**63) <= item < 2**64:
                return path or "the body"
        elif isinstance(item, dict):
            stack += [(f"{path}.{k}" if path else str(k), v) for k, v in reversed(item.items())]
        elif isinstance(item, list):
            stack += [(f"{path}[{i}]", v) for i, v in reversed(list(enumerate(item)))]
    return None


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return type(value).__name__


class PingStatus(enum.StrEnum):
    """Health of a runtime, as AgentCore reports it."""

    HEALTHY = "Healthy"
    HEALTHY_BUSY = "HealthyBusy"

    @classmethod
    def parse(cls, value: Any) -> PingStatus:
        """Accept ``"Healthy"``, ``"healthy"``, ``"healthy_busy"``, ``"HealthyBusy"``..."""
        if isinstance(value, PingStatus):
            return value
        key = str(value).replace("_", "").replace("-", "").replace(" ", "").lower()
        if key == "healthybusy" or key == "busy":
            return cls.HEALTHY_BUSY
        if key in ("healthy", "ok", "up"):
            return cls.HEALTHY
        raise ValueError(f"unknown ping status {value!r}")


class PingResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Body of ``GET /ping``; ``extra`` holds the custom handler's other fields."""

    status: PingStatus = PingStatus.HEALTHY
    time_of_last_update: int = 0
    extra: dict[str, Any] = msgspec.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        out["status"] = self.status.value
        out["time_of_last_update"] = self.time_of_last_update
        return out


_REQUEST_FIELDS = ("prompt", "data", "metadata", "session_id", "stream")


class InvocationRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An invocation as middleware and the client see it.

    The agent's entrypoint receives the plain dict (``to_dict()``); fields this
    Struct does not name are kept in ``extra`` and come back in ``to_dict()``,
    so nothing the caller sent is lost.

    >>> req = InvocationRequest.from_dict({"prompt": "hi", "query": "q"})
    >>> req.prompt, req.extra, req.to_dict()["query"]
    ('hi', {'query': 'q'}, 'q')
    """

    prompt: str | None = None
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    session_id: str | None = None
    stream: bool = False
    extra: dict[str, Any] = msgspec.field(default_factory=dict)

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> InvocationRequest:
        """Build from a decoded body, keeping unknown fields in ``extra``.

        Known fields of the wrong type are kept in ``extra`` too, rather than
        rejected: the body belongs to the agent, which may use ``data`` or
        ``metadata`` differently.
        """
        known: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in payload.items():
            if key in _REQUEST_FIELDS and _fits(key, value):
                known[key] = value
            else:
                extra[key] = value
        return cls(**known, extra=extra)

    def to_dict(self, like: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The plain dict an entrypoint receives.

        Named fields at their default are left out, unless ``like`` (the
        body this request was built from) had them: then they stay, so a
        body that went through middleware reaches the agent with every field.
        """
        out = dict(self.extra)
        for name in _REQUEST_FIELDS:
            value = getattr(self, name)
            if (like is not None and name in like and name not in out) or value not in (
                None,
                {},
                False,
            ):
                out[name] = value
        return out

    def get(self, key: str, default: Any = None) -> Any:
        """Dict-style access over named and extra fields."""
        return self.to_dict().get(key, default)


def _fits(key: str, value: Any) -> bool:
    if key in ("data", "metadata"):
        return isinstance(value, dict)
    if key == "stream":
        return isinstance(value, bool)
    return value is None or isinstance(value, str)


class InvocationResponse(msgspec.Struct, kw_only=True):
    """The non-streaming reply envelope of ``POST /invocations``."""

    result: Any = None
    status: str = "success"
    duration: float = 0.0
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)

    @property
    def request_id(self) -> str | None:
        value = self.metadata.get("request_id")
        return value if isinstance(value, str) else None

    @property
    def session_id(self) -> str | None:
        value = self.metadata.get("session_id")
        return value if isinstance(value, str) else None


def epoch_seconds() -> int:
    return int(time.time())
