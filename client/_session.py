"""A live session on the orchestrator: turns, lifetime, and its end."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal, Self, overload
from urllib.parse import quote

import anyio

from ppio_sandbox.agent_runtime.errors import SessionNotFoundError
from ppio_sandbox.agent_runtime.protocol import InvocationResponse

from ._connection import ApiConnection
from ._invocation import InvocationStream, invoke
from ._models import PreparedInvocation, RequestLike, SessionInfo, Strategy, convert

__all__ = ["CLOSE_TIMEOUT", "SandboxSession", "session_path"]

#: Seconds a close may take (it is shielded from cancellation, so it must end).
CLOSE_TIMEOUT = 10.0


def session_path(session_id: str, suffix: str = "") -> str:
    return f"/v1/sessions/{quote(session_id, safe='')}{suffix}"


class SandboxSession:
    """One session: an agent sandbox whose state lives across turns.

    Turns run one at a time in arrival order. ``strategy`` chooses what a
    turn does when the session is busy: ``"enqueue"`` (wait, the default),
    ``"reject"`` (:class:`SessionBusyError` at once) or ``"interrupt"``
    (cancel the running turn). After :meth:`close`, or once the server ended
    the session (idle timeout, lifetime), a call raises
    :class:`SessionNotFoundError` saying why.

    >>> async def main(client):  # doctest: +SKIP
    ...     async with await client.create_session("assistant", timeout_seconds=600) as session:
    ...         first = await session.invoke({"prompt": "hello"})
    ...         async for chunk in session.stream({"prompt": "and again"}):
    ...             print(chunk)
    """

    def __init__(
        self,
        conn: ApiConnection,
        info: SessionInfo,
        *,
        forget: Callable[[SandboxSession], None] | None = None,
    ) -> None:
        self._conn = conn
        self._info = info
        self._forget = forget
        self._closed = False

    # -- what we know -------------------------------------------------------

    @property
    def session_id(self) -> str:
        return self._info.session_id

    @property
    def template_id(self) -> str:
        return self._info.template_id

    @property
    def info(self) -> SessionInfo:
        """The server's view as of the last call (see :meth:`refresh`)."""
        return self._info

    @property
    def status(self) -> str:
        """The last known status (``ready``, ``busy``, ``paused``, ``closed``...)."""
        return "closed" if self._closed else self._info.status

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called on this object."""
        return self._closed

    def __repr__(self) -> str:
        return f"SandboxSession({self.session_id!r}, template={self.template_id!r}, {self.status})"

    # -- turns --------------------------------------------------------------

    def _prepare(
        self,
        request: RequestLike,
        strategy: Strategy | None,
        idempotency_key: str | None,
        timeout: float | None,
    ) -> PreparedInvocation:
        deadline, seconds = self._conn.deadline(timeout)
        return PreparedInvocation.build(
            session_path(self.session_id, "/invocations"),
            request,
            wire=self._conn.config.wire,
            deadline=deadline,
            timeout=seconds,
            strategy=strategy,
            idempotency_key=idempotency_key,
        )

    @overload
    async def invoke(
        self,
        request: RequestLike,
        *,
        strategy: Strategy | None = ...,
        idempotency_key: str | None = ...,
        timeout: float | None = ...,
        stream: Literal[False] = ...,
    ) -> InvocationResponse: ...

    @overload
    async def invoke(
        self,
        request: RequestLike,
        *,
        strategy: Strategy | None = ...,
        idempotency_key: str | None = ...,
        timeout: float | None = ...,
        stream: Literal[True],
    ) -> InvocationStream: ...

    async def invoke(
        self,
        request: RequestLike,
        *,
        strategy: Strategy | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
        stream: bool = False,
    ) -> InvocationResponse | InvocationStream:
        """Run one turn and return its reply (``stream=True``: an open chunk stream).

        ``request`` is an :class:`InvocationRequest`, a dict (sent as is) or a
        prompt string. ``idempotency_key`` makes a retried turn run once: the
        same key returns the first reply (a different body with it is
        :class:`IdempotencyConflictError`). ``timeout`` overrides the
        configured deadline. A streaming agent's chunks are collected into a
        list as ``result``.
        """
        inv = self._prepare(request, strategy, idempotency_key, timeout)
        if stream:
            chunks = InvocationStream(self._conn, inv)
            await chunks.open()
            return chunks
        return await invoke(self._conn, inv)

    def stream(
        self,
        request: RequestLike,
        *,
        strategy: Strategy | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> InvocationStream:
        """Run one turn and iterate over its chunks as the agent produces them.

        The request is sent on the first iteration (or on ``async with``).
        """
        inv = self._prepare(request, strategy, idempotency_key, timeout)
        return InvocationStream(self._conn, inv)

    # -- lifetime -----------------------------------------------------------

    async def _update(self, method: str, suffix: str = "", body: Any = None) -> SessionInfo:
        view = await self._conn.call(method, session_path(self.session_id, suffix), body)
        self._info = convert(view, SessionInfo)
        return self._info

    async def refresh(self) -> SessionInfo:
        """Fetch the server's current view of the session."""
        return await self._update("GET")

    async def get_status(self) -> str:
        """The session's current status, fetched from the server."""
        return (await self.refresh()).status

    async def ping(self) -> dict[str, Any]:
        """Ask the session's sandbox how it is: ``{"status": "Healthy" | "HealthyBusy", ...}``."""
        value = await self._conn.call("GET", session_path(self.session_id, "/ping"))
        return dict(value) if isinstance(value, dict) else {"status": value}

    async def pause(self) -> SessionInfo:
        """Stop the sandbox's CPU and hold new turns until :meth:`resume`."""
        return await self._update("POST", "/pause")

    async def resume(self) -> SessionInfo:
        """Go on after :meth:`pause`; held turns run."""
        return await self._update("POST", "/resume")

    async def set_timeout(self, seconds: float) -> SessionInfo:
        """End the session after ``seconds`` without a turn (from now on)."""
        return await self._update("POST", "/timeout", {"timeout_seconds": seconds})

    async def close(self) -> None:
        """End the session and its sandbox; a running turn is cancelled.

        Closing twice, or a session the server already ended, is not an error.
        The call is shielded from cancellation and bounded (``CLOSE_TIMEOUT``);
        if the server cannot be reached the error is raised and the session
        stays open (its idle timeout ends it on the server).
        """
        if self._closed:
            return
        with anyio.CancelScope(shield=True), contextlib.suppress(SessionNotFoundError):
            view = await self._conn.call(
                "DELETE", session_path(self.session_id), timeout=CLOSE_TIMEOUT
            )
            self._info = convert(view, SessionInfo)
        self._closed = True
        if self._forget is not None:
            self._forget(self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
