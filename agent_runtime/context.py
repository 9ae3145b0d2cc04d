"""The per-invocation context an entrypoint receives, and per-session state."""

from __future__ import annotations

import itertools
import os
import time
from collections import OrderedDict
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

__all__ = ["RequestContext", "SessionStateStore", "next_request_id"]

_ID_PREFIX = os.urandom(6).hex()
_id_counter = itertools.count(1)


def next_request_id() -> str:
    """A request id unique to this process run: a random prefix and a counter.

    Cheaper than ``uuid4()`` on the hot path, and as unique in practice: the
    48-bit random prefix tells processes apart, the counter requests.
    """
    return f"{_ID_PREFIX}{next(_id_counter):010x}"


class SessionStateStore:
    """``session_id -> dict`` that lives as long as the session.

    A standalone runtime cannot know when a session ends, so it keeps the
    ``max_sessions`` most recently used and evicts the least recently used
    beyond that. The orchestrator gives each session actor its own dict
    instead.
    """

    __slots__ = ("_states", "max_sessions")

    def __init__(self, max_sessions: int = 1024) -> None:
        self.max_sessions = max_sessions
        self._states: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def get(self, session_id: str) -> dict[str, Any]:
        state = self._states.get(session_id)
        if state is None:
            state = self._states[session_id] = {}
            while len(self._states) > self.max_sessions:
                self._states.popitem(last=False)
        else:
            self._states.move_to_end(session_id)
        return state

    def discard(self, session_id: str) -> None:
        self._states.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._states


class RequestContext:
    """What the runtime knows about one invocation.

    ``session_id`` comes from ``X-PPIO-Session-Id`` (or AgentCore's session
    header, or the body's ``session_id``); ``request_id`` from
    ``X-PPIO-Request-Id`` or generated; ``timestamp`` is when the request
    arrived (timezone-aware, UTC); ``headers`` are lower-cased;
    ``metadata`` is the body's ``metadata`` object; ``state`` is a dict that
    lives as long as the session (created on first use). ``traceparent`` is
    the W3C trace context of the invocation (the ``traceparent`` header; under
    the orchestrator, its turn's span), None when it was not traced: an agent
    that traces continues the trace with it, e.g.
    ``opentelemetry.propagate.extract({"traceparent": context.traceparent})``.
    """

    __slots__ = (
        "_headers",
        "_raw_headers",
        "_state",
        "_store",
        "_timestamp",
        "arrived_at",
        "metadata",
        "request_id",
        "session_id",
        "traceparent",
    )

    def __init__(
        self,
        *,
        session_id: str | None = None,
        request_id: str = "",
        timestamp: datetime | None = None,
        arrived_at: float | None = None,
        headers: dict[str, str] | None = None,
        metadata: dict[str, Any] | None = None,
        state: dict[str, Any] | None = None,
        state_store: SessionStateStore | None = None,
        raw_headers: Iterable[tuple[bytes, bytes]] | None = None,
        traceparent: str | None = None,
    ) -> None:
        self.session_id = session_id
        self.request_id = request_id
        self.traceparent = traceparent
        # The datetime is built on first use: most agents never read it.
        self._timestamp = timestamp
        self.arrived_at = timestamp.timestamp() if timestamp else (arrived_at or time.time())
        self.metadata: dict[str, Any] = metadata if metadata is not None else {}
        self._headers = headers
        self._raw_headers = raw_headers
        self._state = state
        self._store = state_store

    @property
    def timestamp(self) -> datetime:
        """When the request arrived (timezone-aware, UTC)."""
        if self._timestamp is None:
            self._timestamp = datetime.fromtimestamp(self.arrived_at, UTC)
        return self._timestamp

    @property
    def trace_id(self) -> str | None:
        """The trace id (32 hex digits) from ``traceparent``; None without a valid one."""
        parts = (self.traceparent or "").split("-")
        if len(parts) < 4 or len(parts[1]) != 32 or parts[1] == "0" * 32:
            return None
        try:
            int(parts[1], 16)
        except ValueError:
            return None
        return parts[1].lower()

    @property
    def headers(self) -> dict[str, str]:
        if self._headers is None:
            self._headers = {
                k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self._raw_headers or ()
            }
        return self._headers

    @property
    def state(self) -> dict[str, Any]:
        """Session-scoped scratch space; per request when there is no session id."""
        if self._state is None:
            if self._store is not None and self.session_id:
                self._state = self._store.get(self.session_id)
            else:
                self._state = {}
        return self._state

    def __repr__(self) -> str:
        return (
            f"RequestContext(session_id={self.session_id!r}, request_id={self.request_id!r}, "
            f"timestamp={self.timestamp.isoformat()!r})"
        )
