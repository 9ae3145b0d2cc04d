"""The reaper: closes sessions at their deadline (idle timeout or lifetime).

One task and one heap for every session of a node, with lazy re-checks: a
session's entry is pushed again when its deadline moved (a turn reset its
idle clock) and dropped when it ended; the heap is compacted when ended
sessions pile up under churn. Deadlines come from the session's core.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any, Protocol

import anyio

from .actor import Session

__all__ = ["Reaper"]


class _Host(Protocol):
    directory: Any

    def clock(self) -> float: ...

    def spawn(self, func: Callable[..., Any], *args: Any) -> None: ...

    async def close_session(self, session: Session, reason: str) -> None: ...


class Reaper:
    """Closes sessions at their deadline: one task, one heap, lazy re-checks."""

    def __init__(self, host: _Host) -> None:
        self.host = host
        self.heap: list[tuple[float, int, Session]] = []
        self.seq = itertools.count()
        self.wake = anyio.Event()
        self.next_at = float("inf")

    def track(self, session: Session) -> None:
        deadline = session.core.deadline()
        heapq.heappush(self.heap, (deadline, next(self.seq), session))
        if len(self.heap) > 2 * len(self.host.directory) + 1024:
            self._compact()
        if deadline < self.next_at:
            self.wake.set()

    def _compact(self) -> None:
        # Entries of closed sessions (and stale deadlines) are dropped lazily
        # when due; under churn they would pile up for a whole idle timeout.
        self.heap = [(s.core.deadline(), next(self.seq), s) for s in self.host.directory]
        heapq.heapify(self.heap)

    async def run(self) -> None:
        host = self.host
        while True:
            now = host.clock()
            while self.heap and self.heap[0][0] <= now:
                _, _, session = heapq.heappop(self.heap)
                core = session.core
                if core.ended:
                    continue
                reason = core.expiry_reason(now)
                if reason is not None:
                    host.spawn(host.close_session, session, reason)
                else:
                    heapq.heappush(self.heap, (core.deadline(), next(self.seq), session))
            self.next_at = self.heap[0][0] if self.heap else float("inf")
            self.wake = anyio.Event()
            with anyio.move_on_after(max(0.0, min(self.next_at - host.clock(), 3600.0))):
                await self.wake.wait()
