"""What the client sends and gets back, besides the shared wire types.

:class:`AgentTemplate` and :class:`SessionInfo` are the orchestrator's views
of a template and a session. :class:`PreparedInvocation` is one logical
invocation, encoded once: every retry (and, later, a resumed stream) sends
exactly these bytes with this ``Idempotency-Key``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import msgspec

from ppio_sandbox.agent_runtime.protocol import (
    CONTENT_JSON,
    CONTENT_MSGPACK,
    HEADER_IDEMPOTENCY_KEY,
    HEADER_REQUEST_ID,
    HEADER_SESSION_ID,
    InvocationRequest,
    decode_json,
    decode_msgpack,
    encode_json,
    encode_msgpack,
)

if TYPE_CHECKING:
    import httpx

__all__ = [
    "HEADER_STRATEGY",
    "AgentTemplate",
    "PreparedInvocation",
    "RequestLike",
    "SessionInfo",
    "Strategy",
    "convert",
    "decode_reply",
    "encode_payload",
    "new_key",
    "request_payload",
]

HEADER_STRATEGY = "X-PPIO-Strategy"


def decode_reply(response: httpx.Response) -> Any:
    """The body of a read response: msgpack or JSON by its Content-Type."""
    data = response.content
    if not data:
        return None
    ctype = response.headers.get("content-type", "")
    if ctype.startswith(CONTENT_MSGPACK):
        return decode_msgpack(data)
    return decode_json(data)


Strategy = Literal["enqueue", "reject", "interrupt"]
RequestLike = InvocationRequest | Mapping[str, Any] | str
"""An invocation: an :class:`InvocationRequest`, a dict (sent as is) or a prompt."""

_T = TypeVar("_T")


class AgentTemplate(msgspec.Struct, kw_only=True):
    """A template as the orchestrator describes it.

    ``phase`` is ``pending``, ``building``, ``deployed`` or ``failed`` (then
    ``error`` says why); ``spec`` is the parsed ``.ppio-agent.yaml`` spec.
    """

    template_id: str
    name: str = ""
    version: str = ""
    phase: str = "pending"
    digest: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    error: str | None = None
    build_log: str | None = None
    spec: dict[str, Any] = msgspec.field(default_factory=dict)

    @property
    def deployed(self) -> bool:
        return self.phase == "deployed"

    @property
    def settled(self) -> bool:
        """True once the build is over (deployed or failed)."""
        return self.phase in ("deployed", "failed")


class SessionInfo(msgspec.Struct, kw_only=True):
    """A session as the orchestrator describes it (times are epoch seconds).

    ``status`` is ``starting``, ``ready``, ``busy``, ``paused``, ``closing``,
    ``closed`` or ``failed``; ``reason`` says why an ended session ended.
    """

    session_id: str
    template_id: str = ""
    status: str = "ready"
    created_at: float = 0.0
    last_activity: float = 0.0
    expires_at: float | None = None
    timeout_seconds: float | None = None
    turns: dict[str, int] = msgspec.field(default_factory=dict)
    restarts: int = 0
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    reason: str | None = None
    sandbox: dict[str, Any] | None = None


def convert(value: Any, kind: type[_T]) -> _T:
    """Build ``kind`` from a decoded view, tolerating fields a newer server adds."""
    return msgspec.convert(value, kind, strict=False)


def new_key() -> str:
    """A fresh Idempotency-Key (also used as request id)."""
    return uuid.uuid4().hex


def request_payload(request: RequestLike) -> dict[str, Any]:
    """The body an agent receives for ``request``.

    >>> request_payload("hi")
    {'prompt': 'hi'}
    >>> request_payload(InvocationRequest(prompt="hi", data={"k": 1}))
    {'prompt': 'hi', 'data': {'k': 1}}
    """
    if isinstance(request, InvocationRequest):
        return request.to_dict()
    if isinstance(request, str):
        return {"prompt": request}
    if isinstance(request, Mapping):
        return dict(request)
    raise TypeError(
        f"request must be an InvocationRequest, a dict or a str, not {type(request).__name__}"
    )


def encode_payload(payload: Any, wire: str) -> tuple[bytes, str]:
    """``(body, content_type)`` for ``payload`` in the configured encoding."""
    if wire == "msgpack":
        return encode_msgpack(payload), CONTENT_MSGPACK
    return encode_json(payload), CONTENT_JSON


@dataclass(frozen=True, slots=True)
class PreparedInvocation:
    """One logical invocation, ready to send (and to send again, unchanged).

    ``deadline`` is absolute, in ``anyio.current_time()`` terms (``inf``: none).
    """

    path: str
    body: bytes
    content_type: str
    key: str
    deadline: float
    timeout: float
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        path: str,
        request: RequestLike | bytes,
        *,
        wire: str,
        deadline: float,
        timeout: float,
        session_id: str | None = None,
        strategy: Strategy | None = None,
        idempotency_key: str | None = None,
        content_type: str | None = None,
        params: Mapping[str, str] | None = None,
    ) -> PreparedInvocation:
        """Encode ``request`` once (raw ``bytes`` are sent as they are)."""
        if isinstance(request, bytes):
            body, ctype = request, content_type or CONTENT_JSON
        else:
            body, ctype = encode_payload(request_payload(request), wire)
        key = idempotency_key or new_key()
        headers = {HEADER_IDEMPOTENCY_KEY: key, HEADER_REQUEST_ID: new_key()}
        if session_id is not None:
            headers[HEADER_SESSION_ID] = session_id
        if strategy is not None:
            headers[HEADER_STRATEGY] = strategy
        if wire == "msgpack":
            headers["Accept"] = f"{CONTENT_MSGPACK}, text/event-stream"
        return cls(
            path=path,
            body=body,
            content_type=ctype,
            key=key,
            deadline=deadline,
            timeout=timeout,
            headers=headers,
            params=dict(params or {}),
        )
