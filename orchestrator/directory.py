"""The session directory: session id -> session record.

An interface, because a multi-node deployment needs a directory shared
between machines (a later milestone, on an existing engine); the embedded
default keeps it in memory. Ended sessions leave a tombstone (bounded, least
recently ended evicted first) so a late call hears why its session is gone.
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from collections.abc import Iterator

from .actor import Session

__all__ = ["InMemorySessionDirectory", "SessionDirectory"]


class SessionDirectory(abc.ABC):
    """Where live sessions are found, and why ended ones ended."""

    @abc.abstractmethod
    def get(self, session_id: str) -> Session | None: ...

    @abc.abstractmethod
    def add(self, session: Session) -> None: ...

    @abc.abstractmethod
    def remove(self, session_id: str, reason: str, tenant: str) -> None:
        """Forget a live session, remembering why it ended."""

    @abc.abstractmethod
    def end_reason(self, session_id: str, tenant: str) -> str | None:
        """Why the tenant's session ended, if it is remembered."""

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Session]: ...

    @abc.abstractmethod
    def __len__(self) -> int: ...


class InMemorySessionDirectory(SessionDirectory):
    """A dict of live sessions plus a bounded dict of tombstones."""

    def __init__(self, max_tombstones: int = 10_000) -> None:
        self._live: dict[str, Session] = {}
        self._ended: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._max_tombstones = max_tombstones

    def get(self, session_id: str) -> Session | None:
        return self._live.get(session_id)

    def add(self, session: Session) -> None:
        if session.session_id in self._live:
            raise KeyError(f"session {session.session_id} exists")
        self._live[session.session_id] = session
        self._ended.pop(session.session_id, None)

    def remove(self, session_id: str, reason: str, tenant: str) -> None:
        if self._live.pop(session_id, None) is None:
            return
        self._ended[session_id] = (tenant, reason)
        while len(self._ended) > self._max_tombstones:
            self._ended.popitem(last=False)

    def end_reason(self, session_id: str, tenant: str) -> str | None:
        ended = self._ended.get(session_id)
        if ended is None or ended[0] != tenant:
            return None
        return ended[1]

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._live.values()))

    def __len__(self) -> int:
        return len(self._live)
