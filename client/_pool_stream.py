"""One turn on a pooled session, as a stream of chunks: :class:`PoolStream`."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import anyio

from ppio_sandbox.agent_runtime.errors import (
    InvocationTimeoutError,
    SandboxCrashedError,
    SessionNotFoundError,
)

from ._invocation import InvocationStream
from ._models import RequestLike, Strategy
from ._session import SandboxSession

if TYPE_CHECKING:
    from ._pool import SessionPool, _Pooled

__all__ = ["LOST", "PoolStream", "unusable_after"]

LOST = (SessionNotFoundError, SandboxCrashedError)
"""Errors saying a pooled session is gone: it is discarded and replaced."""


def unusable_after(exc: BaseException) -> bool:
    """Whether a session must not be handed out again after ``exc`` ended its use.

    Besides a lost session: a deadline or a cancellation that cut the caller
    off mid-turn, since the server may still be running that turn and the
    next holder's turn would queue behind it. Closing the session cancels it.
    """
    return isinstance(exc, (*LOST, InvocationTimeoutError, anyio.get_cancelled_exc_class()))


class PoolStream:
    """The chunks of one turn on a pooled session: an async iterator.

    Returned by :meth:`SessionPool.stream`. The request is sent on the first
    iteration (or ``async with``); the session returns to the pool when the
    stream ends, fails or is closed.
    """

    def __init__(
        self,
        pool: SessionPool,
        request: RequestLike,
        *,
        strategy: Strategy | None,
        idempotency_key: str | None,
        timeout: float | None,
        acquire_timeout: float | None,
    ) -> None:
        self._pool = pool
        self._request = request
        self._strategy: Strategy | None = strategy
        self._key = idempotency_key
        self._timeout = timeout
        self._acquire_timeout = acquire_timeout
        self._item: _Pooled | None = None
        self._stream: InvocationStream | None = None
        self._closed = False

    @property
    def session(self) -> SandboxSession | None:
        """The session the turn runs in (once open)."""
        return self._item.session if self._item is not None else None

    @property
    def last_event_id(self) -> str | None:
        return self._stream.last_event_id if self._stream is not None else None

    @property
    def summary(self) -> dict[str, Any] | None:
        return self._stream.summary if self._stream is not None else None

    async def open(self) -> None:
        """Take a session and send the request (once)."""
        if self._stream is not None:
            return
        if self._closed:
            raise RuntimeError("this stream is closed")
        try:
            await self._open(self._pool)
        except BaseException:
            self._closed = True
            raise

    async def _open(self, pool: SessionPool) -> None:
        for attempt in (1, 2):
            item = await pool._checkout(self._acquire_timeout)
            stream = item.session.stream(
                self._request,
                strategy=self._strategy,
                idempotency_key=self._key,
                timeout=self._timeout,
            )
            try:
                await stream.open()
            except SessionNotFoundError:
                pool._checkin(item, lost=True)
                if attempt == 2:
                    raise
                continue
            except BaseException as exc:
                pool._checkin(item, lost=unusable_after(exc))
                raise
            self._item, self._stream = item, stream
            return

    def _release(self, *, lost: bool) -> None:
        self._closed = True
        item, self._item = self._item, None
        if item is not None:
            self._pool._checkin(item, lost=lost)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Any:
        if self._stream is None:
            if self._closed:
                raise StopAsyncIteration
            await self.open()
        assert self._stream is not None
        try:
            return await self._stream.__anext__()
        except StopAsyncIteration:
            self._release(lost=False)
            raise
        except BaseException as exc:
            await self._stream.aclose()
            self._release(lost=unusable_after(exc))
            raise

    async def aclose(self) -> None:
        """Release the connection and give the session back.

        Closed before its end, a stream leaves its turn running on the
        server: that session is discarded (which cancels the turn) and replaced.
        """
        stream = self._stream
        unfinished = False
        if stream is not None:
            unfinished = self._item is not None and stream.streaming and stream.summary is None
            await stream.aclose()
        self._release(lost=unfinished)

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
