"""Blocking wrappers of a session and of a chunk stream, driven through a portal.

Each method submits one coroutine to the event loop running in the
background thread (an anyio blocking portal) and waits for it.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, Self, TypeVar

from anyio.from_thread import BlockingPortal

from ppio_sandbox.agent_runtime.protocol import InvocationResponse

from ._invocation import InvocationStream
from ._models import RequestLike, SessionInfo, Strategy
from ._session import SandboxSession

__all__ = ["SyncInvocationStream", "SyncSandboxSession", "blocking"]

_P = ParamSpec("_P")
_T = TypeVar("_T")


def blocking(
    portal: BlockingPortal, func: Callable[_P, Awaitable[_T]], *args: _P.args, **kwargs: _P.kwargs
) -> _T:
    """Run ``func(*args, **kwargs)`` on the portal's loop and wait for its result."""
    return portal.call(functools.partial(func, *args, **kwargs))


async def _step(stream: InvocationStream) -> tuple[bool, Any]:
    # StopAsyncIteration must not cross the portal: return a flag instead.
    try:
        return True, await stream.__anext__()
    except StopAsyncIteration:
        return False, None


class SyncInvocationStream:
    """The chunks of one invocation, as a blocking iterator (close it if you stop early)."""

    def __init__(self, portal: BlockingPortal, stream: InvocationStream) -> None:
        self._portal = portal
        self._stream = stream

    @property
    def last_event_id(self) -> str | None:
        return self._stream.last_event_id

    @property
    def summary(self) -> dict[str, Any] | None:
        return self._stream.summary

    @property
    def session_id(self) -> str | None:
        return self._stream.session_id

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Any:
        more, chunk = self._portal.call(_step, self._stream)
        if not more:
            raise StopIteration
        return chunk

    def open(self) -> Self:
        """Send the request now (iterating does it otherwise); raises the server's error."""
        self._portal.call(self._stream.open)
        return self

    def close(self) -> None:
        """Release the connection (and end a one-shot session)."""
        self._portal.call(self._stream.aclose)

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SyncSandboxSession:
    """A :class:`SandboxSession` with blocking methods."""

    def __init__(self, portal: BlockingPortal, session: SandboxSession) -> None:
        self._portal = portal
        self.session = session

    @property
    def session_id(self) -> str:
        return self.session.session_id

    @property
    def template_id(self) -> str:
        return self.session.template_id

    @property
    def status(self) -> str:
        return self.session.status

    @property
    def info(self) -> SessionInfo:
        return self.session.info

    def __repr__(self) -> str:
        return f"Sync{self.session!r}"

    def invoke(
        self,
        request: RequestLike,
        *,
        strategy: Strategy | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> InvocationResponse:
        """Run one turn; see :meth:`SandboxSession.invoke`."""
        return blocking(
            self._portal,
            self.session.invoke,
            request,
            strategy=strategy,
            idempotency_key=idempotency_key,
            timeout=timeout,
        )

    def stream(
        self,
        request: RequestLike,
        *,
        strategy: Strategy | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> SyncInvocationStream:
        """Run one turn and iterate over its chunks."""
        # Built on the loop's thread: its deadline is read from the loop's clock.
        make = functools.partial(
            self.session.stream,
            request,
            strategy=strategy,
            idempotency_key=idempotency_key,
            timeout=timeout,
        )
        return SyncInvocationStream(self._portal, self._portal.call(make))

    def ping(self) -> dict[str, Any]:
        return self._portal.call(self.session.ping)

    def refresh(self) -> SessionInfo:
        return self._portal.call(self.session.refresh)

    def get_status(self) -> str:
        return self._portal.call(self.session.get_status)

    def pause(self) -> SessionInfo:
        return self._portal.call(self.session.pause)

    def resume(self) -> SessionInfo:
        return self._portal.call(self.session.resume)

    def set_timeout(self, seconds: float) -> SessionInfo:
        return blocking(self._portal, self.session.set_timeout, seconds)

    def close(self) -> None:
        self._portal.call(self.session.close)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
