"""The supervisor's pool: warm sessions of one template, handed out one holder at a time.

:class:`SessionPool` keeps ``min_idle`` sessions created ahead (never more
than ``max_size`` in all), checks an idle session before handing it out,
replaces sessions that were lost (closed behind its back, expired, crashed)
and closes everything it created on exit. Acquirers that find no session
free wait in a FIFO queue, each with a deadline; a released session goes
straight to the first of them.

Every task the pool runs (the maintainer, each creation, each close) belongs
to the task group it holds between ``__aenter__`` and ``__aexit__``. State
changes (taking, giving back, handing over) happen without awaiting, so a
session is never in two places and a cancelled waiter can always give back
what it was handed.

>>> async def main(client):  # doctest: +SKIP
...     async with client.pool("assistant", min_idle=2, max_size=8) as pool:
...         async with pool.acquire() as session:  # exclusive until the block ends
...             await session.invoke({"prompt": "remember 42"})
...             print((await session.invoke({"prompt": "what did I say?"})).result)
...         print((await pool.invoke("one turn, any warm session")).result)
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup, TaskStatus

from ppio_sandbox.agent_runtime.errors import (
    InvocationTimeoutError,
    SessionNotFoundError,
    ValidationError,
)
from ppio_sandbox.agent_runtime.protocol import InvocationResponse

from ._config import time_budget
from ._models import RequestLike, Strategy
from ._pool_stream import LOST, PoolStream, unusable_after
from ._session import CLOSE_TIMEOUT, SandboxSession

if TYPE_CHECKING:
    from ._client import AgentRuntimeClient

__all__ = ["HealthCheck", "PoolStats", "PoolTimeoutError", "SessionPool"]

logger = logging.getLogger("ppio_sandbox.client")

HealthCheck = Literal["status", "ping", "none"]
"""How an idle session is checked before it is handed out (see :class:`SessionPool`)."""

#: The server's idle timeout when a session is created without one.
DEFAULT_SESSION_TIMEOUT = 900.0
#: Seconds a health check may take before the session is taken for lost.
CHECK_TIMEOUT = 5.0
#: Statuses of a session that may be handed out.
_USABLE = frozenset({"starting", "ready", "busy"})
#: Failed creations back off from 0.1 s doubling up to this, for keeping ``min_idle``.
_MAX_BACKOFF = 5.0
#: The maintainer looks at the idle sessions at least this often (seconds).
_MAX_SLEEP = 30.0


class PoolTimeoutError(InvocationTimeoutError):
    """No session of the pool came free before the acquire deadline (504).

    All ``max_size`` sessions were in use for the whole wait. The message
    says the pool's size and how long the caller waited.
    """


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of a pool's counters.

    ``size`` counts every session the pool holds (idle, in use, being
    created or being closed); ``waiting`` the acquirers queued for one.
    ``created``, ``replaced`` (lost, expired or broken sessions discarded)
    and ``closed`` are totals since the pool started.
    """

    size: int
    idle: int
    in_use: int
    waiting: int
    created: int
    replaced: int
    closed: int


class _Pooled:
    """A pooled session and what the pool knows of its health."""

    __slots__ = ("ok_at", "session", "timeout", "used_at")

    def __init__(self, session: SandboxSession, now: float, default_timeout: float) -> None:
        self.session = session
        self.ok_at = now  # when it last proved alive (created, checked, used)
        self.used_at = now  # when the server's idle clock last restarted, roughly
        self.timeout = session.info.timeout_seconds or default_timeout


class _Waiter:
    """An acquirer in the queue: handed a session, or an error, then woken."""

    __slots__ = ("error", "event", "item")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.item: _Pooled | None = None
        self.error: BaseException | None = None


class SessionPool:
    """Warm sessions of one template, each handed to one holder at a time.

    Create it with :meth:`AgentRuntimeClient.pool` and start it with
    ``async with``: ``min_idle`` sessions are then created in the background
    and kept ready as sessions are taken, never more than ``max_size`` in
    all. Sessions are created with ``timeout_seconds``, ``env_vars`` and
    ``metadata`` as :meth:`AgentRuntimeClient.create_session` takes them.

    :meth:`acquire` yields a session for exclusive use. An idle session is
    checked first (``health_check``: ``"status"`` reads the server's view of
    the session, ``"ping"`` asks its sandbox, ``"none"`` trusts it), unless
    it proved alive less than ``check_interval`` seconds ago (``0``: always
    check); one that is lost, or that would reach its idle timeout within
    ``recycle_margin`` seconds (at most a quarter of the timeout), is closed
    and replaced. With no session free, a new one is created if the pool is
    below ``max_size``; otherwise the caller waits its turn (first come,
    first served) for ``acquire_timeout`` seconds at most, then gets
    :class:`PoolTimeoutError`.

    A session comes back when the holder's block ends. If the block raised
    :class:`SessionNotFoundError` or :class:`SandboxCrashedError`, or the
    holder closed the session, it is discarded and replaced; likewise when a
    deadline (:class:`InvocationTimeoutError`) or a cancellation ended the
    block, since its turn may still be running on the server.

    Leaving the ``async with`` closes every session the pool created,
    including those still held (their holders' next calls raise
    :class:`SessionNotFoundError`); the closes are shielded from
    cancellation and each bounded by ``CLOSE_TIMEOUT``.
    """

    def __init__(
        self,
        client: AgentRuntimeClient,
        template_id: str,
        *,
        min_idle: int = 1,
        max_size: int = 10,
        timeout_seconds: float | None = None,
        env_vars: Mapping[str, str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        acquire_timeout: float | None = 30.0,
        health_check: HealthCheck = "status",
        check_interval: float = 1.0,
        recycle_margin: float = 5.0,
        create_timeout: float = 60.0,
    ) -> None:
        if min_idle < 0:
            raise ValueError(f"min_idle must be >= 0, got {min_idle}")
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        if min_idle > max_size:
            raise ValueError(f"min_idle ({min_idle}) must not exceed max_size ({max_size})")
        if acquire_timeout is not None and not acquire_timeout > 0:
            raise ValueError("acquire_timeout must be a positive number of seconds, or None")
        if timeout_seconds is not None and not timeout_seconds > 0:
            raise ValueError("timeout_seconds must be a positive number of seconds, or None")
        if health_check not in ("status", "ping", "none"):
            raise ValueError(
                f"health_check must be 'status', 'ping' or 'none', not {health_check!r}"
            )
        for name, value in (("check_interval", check_interval), ("recycle_margin", recycle_margin)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0 seconds, got {value}")
        if not create_timeout > 0:
            raise ValueError("create_timeout must be a positive number of seconds")
        self._client = client
        self.template_id = template_id
        self.min_idle = min_idle
        self.max_size = max_size
        self.timeout_seconds = timeout_seconds
        self.env_vars = dict(env_vars) if env_vars else None
        self.metadata = dict(metadata) if metadata else None
        self.acquire_timeout = acquire_timeout
        self.health_check: HealthCheck = health_check
        self.check_interval = check_interval
        self.recycle_margin = recycle_margin
        self.create_timeout = create_timeout

        self._state: Literal["new", "open", "closing", "closed"] = "new"
        self._tg: TaskGroup | None = None
        self._maintainer: anyio.CancelScope | None = None
        self._wake: anyio.Event | None = None
        self._wake_at = math.inf  # when the maintainer looks again on its own
        self._idle: deque[_Pooled] = deque()  # most recently used last (handed out first)
        self._in_use: set[_Pooled] = set()
        self._waiters: deque[_Waiter] = deque()
        self._creations: set[anyio.CancelScope] = set()
        self._size = 0  # idle + in use + being created + being closed
        self._creating = 0
        self._failures = 0
        self._retry_at = -math.inf
        self._created = self._replaced = self._closed = 0

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"SessionPool({self.template_id!r}, {self._state}, size={s.size}/{self.max_size}, "
            f"idle={s.idle}, in_use={s.in_use}, waiting={s.waiting})"
        )

    def stats(self) -> PoolStats:
        """The pool's counters, now."""
        return PoolStats(
            size=self._size,
            idle=len(self._idle),
            in_use=len(self._in_use),
            waiting=len(self._waiters),
            created=self._created,
            replaced=self._replaced,
            closed=self._closed,
        )

    # -- lifetime -----------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise RuntimeError(f"this pool was already started ({self._state}); create a new one")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._state = "open"
        try:
            await tg.start(self._maintain)
        except BaseException as exc:
            self._state = "closed"
            await tg.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None
        self._state = "closing"
        if self._maintainer is not None:
            self._maintainer.cancel()
        while self._waiters:
            waiter = self._waiters.popleft()
            waiter.error = RuntimeError(f"the pool of {self.template_id!r} was closed")
            waiter.event.set()
        # Sessions being created are awaited, briefly, so that they are closed too.
        cutoff = anyio.current_time() + CLOSE_TIMEOUT
        for scope in self._creations:
            scope.deadline = min(scope.deadline, cutoff)
        items = [*self._idle, *self._in_use]
        self._idle.clear()
        self._in_use.clear()
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for item in items:
                    tg.start_soon(self._close, item)
        try:
            return await self._tg.__aexit__(exc_type, exc, tb)
        finally:
            self._state = "closed"

    def _check_open(self) -> None:
        if self._state == "new":
            raise RuntimeError(
                f"the pool of {self.template_id!r} is not started: use `async with pool:` first"
            )
        if self._state != "open":
            raise RuntimeError(f"the pool of {self.template_id!r} is {self._state}")

    # -- handing out --------------------------------------------------------

    def acquire(
        self, timeout: float | None = None
    ) -> contextlib.AbstractAsyncContextManager[SandboxSession]:
        """A session for exclusive use until the ``async with`` block ends.

        ``timeout`` bounds the wait for a free session (default: the pool's
        ``acquire_timeout``); past it :class:`PoolTimeoutError` is raised.
        """
        return self._lease(timeout)

    @contextlib.asynccontextmanager
    async def _lease(self, timeout: float | None) -> AsyncIterator[SandboxSession]:
        item = await self._checkout(timeout)
        lost = False
        try:
            yield item.session
        except BaseException as exc:
            lost = unusable_after(exc)
            raise
        finally:
            self._checkin(item, lost=lost)

    async def _checkout(self, timeout: float | None) -> _Pooled:
        self._check_open()
        seconds = time_budget(timeout, self.acquire_timeout)
        await anyio.lowlevel.checkpoint()
        self._check_open()
        started = anyio.current_time()
        deadline = started + seconds
        while True:
            if self._idle and not self._waiters:
                item = self._idle.pop()
                self._in_use.add(item)
                self._fill()  # keep min_idle ready behind it
            else:
                item = await self._wait(deadline, started)
            try:
                healthy = await self._healthy(item, deadline, started)
            except BaseException:
                self._give_back(item)  # cancelled, or the server is unreachable
                raise
            if healthy:
                return item
            self._in_use.discard(item)
            self._discard(item)

    async def _wait(self, deadline: float, started: float) -> _Pooled:
        waiter = _Waiter()
        self._waiters.append(waiter)
        self._fill()
        try:
            with anyio.move_on_at(deadline):
                await waiter.event.wait()
            # Cancelled while being handed a session: the session goes to the next in line.
            await anyio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            self._abandon(waiter)
            raise
        if waiter.item is not None:  # even if the deadline passed meanwhile
            return waiter.item
        if waiter.error is not None:
            raise waiter.error
        self._abandon(waiter)
        raise self._timeout_error(started)

    def _abandon(self, waiter: _Waiter) -> None:
        """A waiter leaves the queue; what it was handed goes to the next one."""
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        if waiter.item is not None:
            item, waiter.item = waiter.item, None
            self._give_back(item)

    def _timeout_error(self, started: float) -> PoolTimeoutError:
        waited = anyio.current_time() - started
        return PoolTimeoutError(
            f"no session of the pool of {self.template_id!r} came free within {waited:.2f} s "
            f"(size {self._size}/{self.max_size}, {len(self._in_use)} in use, "
            f"{len(self._waiters)} waiting)"
        )

    async def _healthy(self, item: _Pooled, deadline: float, started: float) -> bool:
        now = anyio.current_time()
        if self._expiring(item, now):
            return False
        if self.health_check == "none" or now - item.ok_at < self.check_interval:
            return True
        session = item.session
        with anyio.move_on_at(min(deadline, now + CHECK_TIMEOUT)) as scope:
            try:
                if self.health_check == "ping":
                    await session.ping()
                else:
                    info = await session.refresh()
                    if info.status not in _USABLE:
                        return False
                    if info.expires_at is not None:
                        left = info.expires_at - time.time()
                        if left < self._margin(item):
                            return False
            except (*LOST, ValidationError):  # ValidationError: no running sandbox
                return False
        if scope.cancelled_caught:
            if anyio.current_time() >= deadline:
                raise self._timeout_error(started)
            return False  # a check that hangs: take the session for lost
        item.ok_at = anyio.current_time()
        return True

    def _margin(self, item: _Pooled) -> float:
        return min(self.recycle_margin, item.timeout / 4)

    def _expiring(self, item: _Pooled, now: float) -> bool:
        return now + self._margin(item) >= item.used_at + item.timeout

    # -- taking back --------------------------------------------------------

    def _checkin(self, item: _Pooled, *, lost: bool) -> None:
        """A holder is done with ``item`` (no await: this cannot be interrupted)."""
        if item not in self._in_use:
            return  # closed by the pool's exit meanwhile
        self._in_use.discard(item)
        if lost or item.session.closed:
            self._discard(item)
            return
        item.used_at = item.ok_at = anyio.current_time()
        self._offer(item)

    def _give_back(self, item: _Pooled) -> None:
        """Return an unused session (its health is what it was)."""
        if item in self._in_use:
            self._in_use.discard(item)
            self._offer(item)

    def _offer(self, item: _Pooled) -> None:
        """Hand ``item`` to the first waiter, else make it idle."""
        if self._state != "open":
            self._discard(item, replace=False)
            return
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.item = item
            self._in_use.add(item)
            waiter.event.set()
            return
        self._idle.append(item)
        if item.used_at + item.timeout - self._margin(item) < self._wake_at:
            self._poke()  # it expires before the maintainer would look again

    def _discard(self, item: _Pooled, *, replace: bool = True) -> None:
        """Close ``item`` in the background; a replacement follows once it is closed."""
        if replace and self._state == "open":
            self._replaced += 1
        if self._tg is None or self._state == "closed":
            self._size -= 1
            return
        self._tg.start_soon(self._close, item)

    async def _close(self, item: _Pooled) -> None:
        try:
            await item.session.close()
            self._closed += 1
        except Exception as exc:  # the server's idle timeout will end it
            logger.warning(
                "pool %r: could not close session %s: %s",
                self.template_id,
                item.session.session_id,
                exc,
            )
        finally:
            self._size -= 1
            self._fill()

    # -- keeping min_idle -------------------------------------------------------

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _fill(self) -> None:
        """Start creating sessions for the waiters and to keep ``min_idle`` ready."""
        if self._state != "open" or self._tg is None:
            return
        want = len(self._waiters)
        if anyio.current_time() >= self._retry_at:
            want += self.min_idle
        missing = min(want - len(self._idle) - self._creating, self.max_size - self._size)
        for _ in range(missing):
            self._size += 1
            self._creating += 1
            self._tg.start_soon(self._create)

    async def _create(self) -> None:
        session: SandboxSession | None = None
        error: BaseException | None = None
        # Shielded: a session the server created must not be lost to a cancellation.
        with anyio.CancelScope(
            shield=True, deadline=anyio.current_time() + self.create_timeout
        ) as scope:
            self._creations.add(scope)
            try:
                session = await self._client.create_session(
                    self.template_id, self.timeout_seconds, self.env_vars, self.metadata
                )
            except Exception as exc:
                error = exc
            finally:
                self._creations.discard(scope)
                self._creating -= 1
        if session is None:
            self._size -= 1
            if error is None:
                error = InvocationTimeoutError(
                    f"creating a session of {self.template_id!r} took longer than "
                    f"{self.create_timeout:g} s"
                )
            self._creation_failed(error)
            return
        self._failures = 0
        self._retry_at = -math.inf
        self._created += 1
        now = anyio.current_time()
        self._offer(_Pooled(session, now, self.timeout_seconds or DEFAULT_SESSION_TIMEOUT))

    def _creation_failed(self, error: BaseException) -> None:
        self._failures += 1
        delay = min(_MAX_BACKOFF, 0.1 * 2 ** (self._failures - 1))
        self._retry_at = anyio.current_time() + delay
        logger.warning(
            "pool %r: could not create a session (retrying in %.1f s): %s",
            self.template_id,
            delay,
            error,
        )
        if self._waiters:  # the first in line hears why, rather than waiting in vain
            waiter = self._waiters.popleft()
            waiter.error = error
            waiter.event.set()
        self._fill()
        self._poke()

    async def _maintain(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Recycle idle sessions close to their idle timeout; keep ``min_idle`` ready."""
        with anyio.CancelScope() as scope:
            self._maintainer = scope
            task_status.started()
            while True:
                now = anyio.current_time()
                for item in [i for i in self._idle if self._expiring(i, now)]:
                    self._idle.remove(item)
                    self._discard(item)
                self._fill()
                self._wake = anyio.Event()
                self._wake_at = self._next_look(now)
                with anyio.move_on_at(self._wake_at):
                    await self._wake.wait()

    def _next_look(self, now: float) -> float:
        until = [now + _MAX_SLEEP]
        until.extend(i.used_at + i.timeout - self._margin(i) for i in self._idle)
        if self._retry_at > now:
            until.append(self._retry_at)
        return max(now + 0.01, min(until))

    # -- session-less turns -------------------------------------------------

    async def invoke(
        self,
        request: RequestLike,
        *,
        strategy: Strategy | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
        acquire_timeout: float | None = None,
    ) -> InvocationResponse:
        """Run one turn on any pooled session and give the session back.

        If the session turns out to be gone (:class:`SessionNotFoundError`)
        it is replaced and the turn runs once more on another session.
        ``timeout`` bounds the turn (as for :meth:`SandboxSession.invoke`),
        ``acquire_timeout`` the wait for a session.
        """
        for attempt in (1, 2):
            item = await self._checkout(acquire_timeout)
            lost = False
            try:
                return await item.session.invoke(
                    request, strategy=strategy, idempotency_key=idempotency_key, timeout=timeout
                )
            except SessionNotFoundError:
                lost = True
                if attempt == 2:
                    raise
            except BaseException as exc:
                lost = unusable_after(exc)
                raise
            finally:
                self._checkin(item, lost=lost)
        raise AssertionError("unreachable")

    def stream(
        self,
        request: RequestLike,
        *,
        strategy: Strategy | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
        acquire_timeout: float | None = None,
    ) -> PoolStream:
        """Run one turn on any pooled session and iterate over its chunks.

        The session goes back to the pool when the stream ends or is closed
        (use ``async with`` when leaving early). A session found gone before
        the first chunk is replaced and the turn sent once more.
        """
        return PoolStream(
            self,
            request,
            strategy=strategy,
            idempotency_key=idempotency_key,
            timeout=timeout,
            acquire_timeout=acquire_timeout,
        )
