"""A blocking wrapper of :class:`SessionPool`, driven through a portal.

The pool's task group runs in one task on the portal's event loop (anyio's
``wrap_async_context_manager``), from ``with`` to the end of the block; each
acquire is likewise one task holding the session until the ``with`` ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Self

from anyio.from_thread import BlockingPortal

from ppio_sandbox.agent_runtime.protocol import InvocationResponse

from ._models import RequestLike, Strategy
from ._pool import PoolStats, SessionPool
from ._sync_session import SyncSandboxSession, blocking

__all__ = ["SyncSessionPool"]


class SyncSessionPool:
    """A :class:`SessionPool` for synchronous code; start it with ``with``.

    >>> with client.pool("assistant", min_idle=2, max_size=8) as pool:  # doctest: +SKIP
    ...     with pool.acquire(timeout=5) as session:
    ...         print(session.invoke("hello").result)
    ...     print(pool.invoke("any warm session will do").result)
    """

    def __init__(self, portal: BlockingPortal, pool: SessionPool) -> None:
        self._portal = portal
        self.pool = pool
        self._running: contextlib.AbstractContextManager[SessionPool] | None = None

    def __repr__(self) -> str:
        return f"Sync{self.pool!r}"

    def __enter__(self) -> Self:
        running = self._portal.wrap_async_context_manager(self.pool)
        running.__enter__()
        self._running = running
        return self

    def __exit__(self, *exc_info: object) -> None:
        running, self._running = self._running, None
        if running is not None:
            running.__exit__(None, None, None)

    def stats(self) -> PoolStats:
        """The pool's counters, now."""
        return self.pool.stats()

    @contextlib.contextmanager
    def acquire(self, timeout: float | None = None) -> Iterator[SyncSandboxSession]:
        """A session for exclusive use until the ``with`` block ends (see ``SessionPool``)."""
        with self._portal.wrap_async_context_manager(self.pool.acquire(timeout)) as session:
            yield SyncSandboxSession(self._portal, session)

    def invoke(
        self,
        request: RequestLike,
        *,
        strategy: Strategy | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
        acquire_timeout: float | None = None,
    ) -> InvocationResponse:
        """Run one turn on any pooled session; see :meth:`SessionPool.invoke`."""
        return blocking(
            self._portal,
            self.pool.invoke,
            request,
            strategy=strategy,
            idempotency_key=idempotency_key,
            timeout=timeout,
            acquire_timeout=acquire_timeout,
        )
