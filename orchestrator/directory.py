"""The session directory: (tenant, session id) -> session record.

Session ids are per tenant: two tenants may both name a session ``chat-1``
and never see, block or learn of each other's. An interface, because a
multi-node deployment keeps the directory of *where* sessions live in an
engine shared between machines; this one is the node-local table of the
sessions a node hosts. Ended sessions leave a tombstone (bounded, least
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
    def get(self, tenant: str, session_id: str) -> Session | None: ...

    @abc.abstractmethod
    def add(self, session: Session) -> None: ...

    @abc.abstractmethod
    def remove(self, tenant: str, session_id: str, reason: str | None) -> None:
        """Forget a live session, remembering why it ended (no tombstone if ``reason`` is None)."""

    @abc.abstractmethod
    def add_tombstone(self, tenant: str, session_id: str, reason: str) -> None:
        """Remember why a session that is not live here ended."""

    @abc.abstractmethod
    def end_reason(self, tenant: str, session_id: str) -> str | None:
        """Why the tenant's session ended, if it is remembered."""

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Session]: ...

    @abc.abstractmethod
    def __len__(self) -> int: ...


class InMemorySessionDirectory(SessionDirectory):
    """A dict of live sessions plus a bounded dict of tombstones."""

    def __init__(self, max_tombstones: int = 10_000) -> None:
        self._live: dict[tuple[str, str], Session] = {}
        self._ended: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._max_tombstones = max_tombstones

    def get(self, tenant: str, session_id: str) -> Session | None:
        return self._live.get((tenant, session_id))

    def add(self, session: Session) -> None:
        key = (session.tenant, session.session_id)
        if key in self._live:
            raise KeyError(f"session {session.session_id} exists")
        self._live[key] = session
        self._ended.pop(key, None)

    def remove(self, tenant: str, session_id: str, reason: str | None) -> None:
        key = (tenant, session_id)
        if self._live.pop(key, None) is None or reason is None:
            return
        self.add_tombstone(tenant, session_id, reason)

    def add_tombstone(self, tenant: str, session_id: str, reason: str) -> None:
        self._ended[(tenant, session_id)] = reason
        while len(self._ended) > self._max_tombstones:
            self._ended.popitem(last=False)

    def end_reason(self, tenant: str, session_id: str) -> str | None:
        return self._ended.get((tenant, session_id))

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._live.values()))

    def __len__(self) -> int:
        return len(self._live)
