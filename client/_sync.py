"""A blocking facade over :class:`AgentRuntimeClient`, for synchronous backends.

The async client runs on an event loop in a background thread (an anyio
blocking portal); each blocking method submits one coroutine to it and waits.
The facade is thread-safe: many request threads (Django, Flask) may share one
client and its connection pool.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, overload

import httpx
from anyio.from_thread import start_blocking_portal

from ppio_sandbox.agent_runtime.protocol import CONTENT_JSON, InvocationResponse

from ._client import AgentRuntimeClient
from ._config import ClientConfig
from ._invocation import InvocationStream
from ._models import AgentTemplate, RequestLike, Strategy
from ._sync_pool import SyncSessionPool
from ._sync_session import SyncInvocationStream, SyncSandboxSession, blocking

__all__ = ["SyncAgentRuntimeClient"]


class SyncAgentRuntimeClient:
    """:class:`AgentRuntimeClient` for synchronous code; same arguments, same methods.

    ``transport`` must be an async httpx transport (the client runs on an
    event loop in a background thread, on ``backend`` ``"asyncio"`` or
    ``"trio"``). Close it (``with`` or :meth:`close`) to stop that thread.

    >>> from ppio_sandbox.agent_runtime import SyncAgentRuntimeClient
    >>> with SyncAgentRuntimeClient(api_key="your-key") as client:  # doctest: +SKIP
    ...     print(client.invoke_agent("assistant", "hello").result)
    ...     with client.create_session("assistant") as session:
    ...         for chunk in session.stream({"prompt": "tell me more"}):
    ...             print(chunk)
    """

    def __init__(
        self,
        api_key: str | None = None,
        api_secret: str | None = None,
        config: ClientConfig | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        backend: str = "asyncio",
    ) -> None:
        self._stack = ExitStack()
        self._portal = self._stack.enter_context(
            start_blocking_portal(backend, name="ppio-sandbox-client")
        )
        try:
            make = functools.partial(
                AgentRuntimeClient, api_key, api_secret, config, transport=transport
            )
            self.client: AgentRuntimeClient = self._portal.call(make)
        except BaseException:
            self._stack.close()
            raise
        self._closed = False

    @property
    def config(self) -> ClientConfig:
        return self.client.config

    def __repr__(self) -> str:
        return f"Sync{self.client!r}"

    def close(self) -> None:
        """Close the sessions this client created, its connections and its thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self._portal.call(self.client.aclose)
        finally:
            self._stack.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- invocations --------------------------------------------------------

    @overload
    def invoke_agent(
        self,
        template_id: str,
        request: RequestLike,
        *,
        session_id: str | None = ...,
        timeout: float | None = ...,
        strategy: Strategy | None = ...,
        idempotency_key: str | None = ...,
        stream: Literal[False] = ...,
    ) -> InvocationResponse: ...

    @overload
    def invoke_agent(
        self,
        template_id: str,
        request: RequestLike,
        *,
        session_id: str | None = ...,
        timeout: float | None = ...,
        strategy: Strategy | None = ...,
        idempotency_key: str | None = ...,
        stream: Literal[True],
    ) -> SyncInvocationStream: ...

    def invoke_agent(
        self,
        template_id: str,
        request: RequestLike,
        *,
        session_id: str | None = None,
        timeout: float | None = None,
        strategy: Strategy | None = None,
        idempotency_key: str | None = None,
        stream: bool = False,
    ) -> InvocationResponse | SyncInvocationStream:
        """Invoke an agent; see :meth:`AgentRuntimeClient.invoke_agent`."""
        options: dict[str, Any] = {
            "session_id": session_id,
            "timeout": timeout,
            "strategy": strategy,
            "idempotency_key": idempotency_key,
        }
        if stream:
            return self.stream_agent(template_id, request, **options).open()
        call = functools.partial(self.client.invoke_agent, template_id, request, **options)
        return self._portal.call(call)

    def stream_agent(
        self,
        template_id: str,
        request: RequestLike,
        *,
        session_id: str | None = None,
        timeout: float | None = None,
        strategy: Strategy | None = None,
        idempotency_key: str | None = None,
    ) -> SyncInvocationStream:
        """Invoke and iterate over the chunks; see :meth:`AgentRuntimeClient.stream_agent`."""
        make = functools.partial(
            self.client.stream_agent,
            template_id,
            request,
            session_id=session_id,
            timeout=timeout,
            strategy=strategy,
            idempotency_key=idempotency_key,
        )
        return SyncInvocationStream(self._portal, self._portal.call(make))

    def invoke_agent_runtime(
        self,
        agentId: str,  # AgentCore's parameter names
        payload: bytes | str | Mapping[str, Any],
        runtimeSessionId: str | None = None,
        qualifier: str | None = None,
        *,
        contentType: str = CONTENT_JSON,
        timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """AgentCore style; a streamed ``response`` is a blocking iterator here."""
        out = blocking(
            self._portal,
            self.client.invoke_agent_runtime,
            agentId,
            payload,
            runtimeSessionId,
            qualifier,
            contentType=contentType,
            timeout=timeout,
            idempotency_key=idempotency_key,
        )
        if isinstance(out.get("response"), InvocationStream):
            out["response"] = SyncInvocationStream(self._portal, out["response"])
        return out

    # -- sessions -----------------------------------------------------------

    def create_session(
        self,
        template_id: str,
        timeout_seconds: float | None = None,
        env_vars: Mapping[str, str] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> SyncSandboxSession:
        """Start a session; see :meth:`AgentRuntimeClient.create_session`."""
        session = blocking(
            self._portal,
            self.client.create_session,
            template_id,
            timeout_seconds,
            env_vars,
            metadata,
        )
        return SyncSandboxSession(self._portal, session)

    def get_session(self, session_id: str) -> SyncSandboxSession:
        session = blocking(self._portal, self.client.get_session, session_id)
        return SyncSandboxSession(self._portal, session)

    def list_sessions(self) -> list[SyncSandboxSession]:
        sessions = self._portal.call(self.client.list_sessions)
        return [SyncSandboxSession(self._portal, s) for s in sessions]

    def close_session(self, session_id: str) -> None:
        blocking(self._portal, self.client.close_session, session_id)

    def close_all_sessions(self) -> None:
        self._portal.call(self.client.close_all_sessions)

    def pool(self, template_id: str, **options: Any) -> SyncSessionPool:
        """A pool of warm sessions, used with ``with``; see :meth:`AgentRuntimeClient.pool`."""
        return SyncSessionPool(self._portal, self.client.pool(template_id, **options))

    # -- templates ----------------------------------------------------------

    def list_templates(self, *, refresh: bool = False) -> list[AgentTemplate]:
        return blocking(self._portal, self.client.list_templates, refresh=refresh)

    def get_template(self, template_id: str, *, refresh: bool = False) -> AgentTemplate:
        return blocking(self._portal, self.client.get_template, template_id, refresh=refresh)

    def deploy_template(
        self, path: str | Path, *, wait: bool = True, timeout: float | None = None
    ) -> AgentTemplate:
        return blocking(self._portal, self.client.deploy_template, path, wait=wait, timeout=timeout)

    def delete_template(self, template_id: str) -> None:
        blocking(self._portal, self.client.delete_template, template_id)

    def health(self) -> dict[str, Any]:
        return self._portal.call(self.client.health)
