"""The backend developer's entry point: :class:`AgentRuntimeClient`."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, overload
from urllib.parse import quote

import anyio
import httpx

from ppio_sandbox.agent_runtime.errors import PPIOAgentRuntimeError
from ppio_sandbox.agent_runtime.protocol import (
    CONTENT_JSON,
    HEADER_SESSION_ID,
    InvocationResponse,
    encode_json,
)

from ._auth import AuthManager
from ._config import ClientConfig, resolve_credentials
from ._connection import ApiConnection
from ._invocation import InvocationStream, invoke, invoke_runtime
from ._models import AgentTemplate, PreparedInvocation, RequestLike, SessionInfo, Strategy, convert
from ._pool import HealthCheck, SessionPool
from ._session import CLOSE_TIMEOUT, SandboxSession, session_path
from ._templates import TemplateManager

__all__ = ["AgentRuntimeClient"]

logger = logging.getLogger("ppio_sandbox.client")


def _agent_path(agent_id: str) -> str:
    return f"/v1/agents/{quote(agent_id, safe='')}/invocations"


class AgentRuntimeClient:
    """Call agents hosted by a PPIO orchestrator: one-shot, in sessions, streamed.

    Credentials: ``api_key`` alone is sent as a Bearer token; with
    ``api_secret`` every request is HMAC-signed (``api_key`` is then the access
    key id). Without arguments ``$PPIO_API_KEY`` and ``$PPIO_API_SECRET`` are
    used, and ``$PPIO_BASE_URL`` names the server unless ``config`` does.
    ``transport`` replaces httpx's (e.g. ``httpx.AsyncHTTPTransport(uds=...)``)
    for ``base_url``; a session's owner node (see below) is reached over
    httpx's own transport.

    One client holds one keep-alive connection pool: create it once, use it
    for many calls, close it with ``async with`` or :meth:`aclose` (alias
    :meth:`close`; it also closes the sessions it created). In a cluster it
    also keeps a pool per node that owns one of its sessions, and sends
    that session's requests there directly (``ClientConfig.direct_to_owner``).

    >>> import asyncio
    >>> from ppio_sandbox.agent_runtime import AgentRuntimeClient, InvocationRequest
    >>> async def main():  # doctest: +SKIP
    ...     async with AgentRuntimeClient(api_key="your-key", api_secret="your-secret") as client:
    ...         response = await client.invoke_agent(
    ...             template_id="assistant",
    ...             request=InvocationRequest(prompt="Hello, world!", data={"user_id": "123"}),
    ...         )
    ...         print(response.result)
    >>> asyncio.run(main())  # doctest: +SKIP
    """

    def __init__(
        self,
        api_key: str | None = None,
        api_secret: str | None = None,
        config: ClientConfig | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config if config is not None else ClientConfig()
        key, secret = resolve_credentials(api_key, api_secret)
        if secret is not None and key is None:
            raise ValueError("api_secret needs an api_key (the access key id)")
        self.auth = AuthManager(key, secret) if key is not None else None
        self._conn = ApiConnection(self.config, auth=self.auth, transport=transport)
        self.templates = TemplateManager(
            self._conn, enabled=self.config.enable_cache, ttl=self.config.cache_ttl
        )
        self._sessions: dict[str, SandboxSession] = {}

    @property
    def http_client(self) -> httpx.AsyncClient:
        """The ``httpx.AsyncClient`` of ``base_url`` (e.g. to add event hooks).

        The pools to sessions' owner nodes start with its event hooks as they
        are when each pool is opened (on the first request to that node).
        """
        return self._conn.http

    def __repr__(self) -> str:
        scheme = self.auth.scheme if self.auth is not None else "none"
        return f"AgentRuntimeClient(base_url={self.config.base_url!r}, auth={scheme!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the sessions this client created (best effort), then its connections."""
        with anyio.CancelScope(shield=True):
            try:
                await self.close_all_sessions()
            except PPIOAgentRuntimeError as exc:
                logger.warning("could not close every session: %s", exc)
            finally:
                await self._conn.aclose()

    async def close(self) -> None:
        """The same as :meth:`aclose` (the name other SDKs use)."""
        await self.aclose()

    # -- invocations --------------------------------------------------------

    def _prepare_agent_call(
        self,
        template_id: str,
        request: RequestLike,
        session_id: str | None,
        timeout: float | None,
        strategy: Strategy | None,
        idempotency_key: str | None,
    ) -> tuple[PreparedInvocation, bool]:
        one_shot = session_id is None
        deadline, seconds = self._conn.deadline(timeout)
        inv = PreparedInvocation.build(
            _agent_path(template_id),
            request,
            wire=self.config.wire,
            deadline=deadline,
            timeout=seconds,
            session_id=session_id or f"oneshot-{uuid.uuid4().hex}",
            strategy=strategy,
            idempotency_key=idempotency_key,
        )
        return inv, one_shot

    async def _discard_session(self, session_id: str) -> None:
        """End a one-shot session, whatever happened to its turn (bounded, shielded)."""
        # A session never created (unknown template...) or already gone is fine.
        with anyio.CancelScope(shield=True), contextlib.suppress(PPIOAgentRuntimeError):
            await self._conn.call("DELETE", session_path(session_id), timeout=CLOSE_TIMEOUT)

    @overload
    async def invoke_agent(
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
    async def invoke_agent(
        self,
        template_id: str,
        request: RequestLike,
        *,
        session_id: str | None = ...,
        timeout: float | None = ...,
        strategy: Strategy | None = ...,
        idempotency_key: str | None = ...,
        stream: Literal[True],
    ) -> InvocationStream: ...

    async def invoke_agent(
        self,
        template_id: str,
        request: RequestLike,
        *,
        session_id: str | None = None,
        timeout: float | None = None,
        strategy: Strategy | None = None,
        idempotency_key: str | None = None,
        stream: bool = False,
    ) -> InvocationResponse | InvocationStream:
        """Invoke the agent of ``template_id`` (a template id or an agent name).

        With ``session_id`` the turn runs in that session, which the server
        creates on first use (AgentCore style): pass the same id again for a
        multi-turn conversation. Without it the call is one-shot: a fresh
        session, named by the client, is created by the invocation itself and
        closed right after, whatever happened (so a deadline also cancels the
        agent's work). ``stream=True`` returns the open :class:`InvocationStream`
        (the one-shot session then closes with it).

        ``request`` is an :class:`InvocationRequest`, a dict or a prompt.
        ``timeout`` overrides ``ClientConfig.timeout``; past it
        :class:`InvocationTimeoutError` is raised at once. ``strategy`` and
        ``idempotency_key`` are as for :meth:`SandboxSession.invoke`.
        """
        if stream:
            chunks = self.stream_agent(
                template_id,
                request,
                session_id=session_id,
                timeout=timeout,
                strategy=strategy,
                idempotency_key=idempotency_key,
            )
            await chunks.open()
            return chunks
        inv, one_shot = self._prepare_agent_call(
            template_id, request, session_id, timeout, strategy, idempotency_key
        )
        if not one_shot:
            return await invoke(self._conn, inv)
        try:
            return await invoke(self._conn, inv)
        finally:
            await self._discard_session(inv.headers[HEADER_SESSION_ID])

    def stream_agent(
        self,
        template_id: str,
        request: RequestLike,
        *,
        session_id: str | None = None,
        timeout: float | None = None,
        strategy: Strategy | None = None,
        idempotency_key: str | None = None,
    ) -> InvocationStream:
        """Invoke and iterate over the agent's chunks as they are produced.

        Same arguments as :meth:`invoke_agent`; the request is sent on the
        first iteration (or ``async with``). A one-shot session is closed when
        the stream ends or is closed.

        >>> async def main(client):  # doctest: +SKIP
        ...     async for chunk in client.stream_agent("assistant", "tell me a story"):
        ...         print(chunk)
        """
        inv, one_shot = self._prepare_agent_call(
            template_id, request, session_id, timeout, strategy, idempotency_key
        )
        sid = inv.headers[HEADER_SESSION_ID]

        async def discard() -> None:
            await self._discard_session(sid)

        return InvocationStream(self._conn, inv, on_close=discard if one_shot else None)

    async def invoke_agent_runtime(
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
        """AgentCore's ``invoke_agent_runtime``: raw payload in, a response dict out.

        ``payload`` is sent as is (``str`` as UTF-8, a mapping as JSON). The
        session ``runtimeSessionId`` is created on first use and kept (a new
        id is generated when none is given; reuse the returned one). Returns
        ``{"runtimeSessionId", "contentType", "statusCode", "requestId",
        "response"}`` where ``response`` is the agent's result, or, when
        ``contentType`` is ``text/event-stream``, an :class:`InvocationStream`
        of chunks to iterate (and close).
        """
        if isinstance(payload, str):
            body = payload.encode("utf-8")
        elif isinstance(payload, Mapping):
            body, contentType = encode_json(dict(payload)), CONTENT_JSON
        else:
            body = bytes(payload)
        sid = runtimeSessionId or f"runtime-{uuid.uuid4().hex}"
        deadline, seconds = self._conn.deadline(timeout)
        inv = PreparedInvocation.build(
            _agent_path(agentId),
            body,
            wire=self.config.wire,
            deadline=deadline,
            timeout=seconds,
            session_id=sid,
            idempotency_key=idempotency_key,
            content_type=contentType,
            params={"qualifier": qualifier} if qualifier else None,
        )
        return await invoke_runtime(self._conn, inv)

    # -- sessions -----------------------------------------------------------

    def _forget(self, session: SandboxSession) -> None:
        if self._sessions.get(session.session_id) is session:
            del self._sessions[session.session_id]

    def _wrap(self, view: Any) -> SandboxSession:
        info = convert(view, SessionInfo)
        known = self._sessions.get(info.session_id)
        if known is not None:
            known._info = info
            return known
        return SandboxSession(self._conn, info, forget=self._forget)

    async def create_session(
        self,
        template_id: str,
        timeout_seconds: float | None = None,
        env_vars: Mapping[str, str] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> SandboxSession:
        """Start a session of ``template_id``; returns once its sandbox is ready.

        ``timeout_seconds`` ends it after that long without a turn (server
        default 900); ``env_vars`` reach a process sandbox's environment;
        ``metadata`` is kept with the session. The client remembers the
        session and closes it in :meth:`close_all_sessions` / :meth:`aclose`.
        """
        body: dict[str, Any] = {"template_id": template_id}
        if timeout_seconds is not None:
            body["timeout_seconds"] = timeout_seconds
        if env_vars:
            body["env_vars"] = dict(env_vars)
        if metadata:
            body["metadata"] = dict(metadata)
        session = self._wrap(await self._conn.call("POST", "/v1/sessions", body))
        self._sessions[session.session_id] = session
        return session

    async def get_session(self, session_id: str) -> SandboxSession:
        """A live session by id (any created by this tenant); 404 naming why it ended."""
        return self._wrap(await self._conn.call("GET", session_path(session_id)))

    async def list_sessions(self) -> list[SandboxSession]:
        """Every live session of this client's tenant."""
        reply = await self._conn.call("GET", "/v1/sessions")
        views = reply.get("sessions", []) if isinstance(reply, dict) else []
        return [self._wrap(view) for view in views]

    async def close_session(self, session_id: str) -> None:
        """Close a session by id (not an error if it already ended)."""
        session = self._sessions.get(session_id) or SandboxSession(
            self._conn, SessionInfo(session_id=session_id)
        )
        await session.close()

    async def close_all_sessions(self) -> None:
        """Close every session this client created and has not closed yet.

        All are tried, concurrently; then the first failure, if any, is raised.
        """
        errors: list[PPIOAgentRuntimeError] = []

        async def close(session: SandboxSession) -> None:
            try:
                await session.close()
            except PPIOAgentRuntimeError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for session in list(self._sessions.values()):
                tg.start_soon(close, session)
        if errors:
            raise errors[0]

    def pool(
        self,
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
    ) -> SessionPool:
        """A pool of warm sessions of ``template_id``; start it with ``async with``.

        ``min_idle`` sessions are kept ready, ``max_size`` at most exist;
        ``pool.acquire()`` hands one out for exclusive use, ``pool.invoke()``
        runs a turn on any of them. The other arguments are described in
        :class:`SessionPool`.

        >>> async def main(client):  # doctest: +SKIP
        ...     async with client.pool("assistant", min_idle=2, max_size=8) as pool:
        ...         async with pool.acquire(timeout=5) as session:
        ...             print((await session.invoke("hello")).result)
        """
        return SessionPool(
            self,
            template_id,
            min_idle=min_idle,
            max_size=max_size,
            timeout_seconds=timeout_seconds,
            env_vars=env_vars,
            metadata=metadata,
            acquire_timeout=acquire_timeout,
            health_check=health_check,
            check_interval=check_interval,
            recycle_margin=recycle_margin,
            create_timeout=create_timeout,
        )

    # -- templates ----------------------------------------------------------

    async def list_templates(self, *, refresh: bool = False) -> list[AgentTemplate]:
        """The templates this tenant can use (cached for ``cache_ttl`` seconds)."""
        return await self.templates.list_templates(refresh=refresh)

    async def get_template(self, template_id: str, *, refresh: bool = False) -> AgentTemplate:
        """One template by id or agent name; :class:`TemplateNotFoundError` if unknown."""
        return await self.templates.get_template(template_id, refresh=refresh)

    async def deploy_template(
        self, path: str | Path, *, wait: bool = True, timeout: float | None = None
    ) -> AgentTemplate:
        """Deploy an agent directory; see :meth:`TemplateManager.deploy`."""
        return await self.templates.deploy(path, wait=wait, timeout=timeout)

    async def delete_template(self, template_id: str) -> None:
        """Delete a template (its sessions are closed)."""
        await self.templates.delete(template_id)

    async def health(self) -> dict[str, Any]:
        """The orchestrator's ``/healthz`` (no credentials needed)."""
        value = await self._conn.call("GET", "/healthz")
        return dict(value) if isinstance(value, dict) else {"status": value}
