"""The backend-side SDK: call agents hosted by a PPIO orchestrator.

>>> from ppio_sandbox.client import AgentRuntimeClient, ClientConfig
>>> async def main():  # doctest: +SKIP
...     config = ClientConfig(base_url="http://127.0.0.1:8900", timeout=60)
...     async with AgentRuntimeClient(api_key="k1", api_secret="s3cret", config=config) as client:
...         print((await client.invoke_agent("assistant", "hello")).result)   # one-shot
...         async with await client.create_session("assistant") as session:  # multi-turn
...             await session.invoke({"prompt": "remember 42"})
...             async for chunk in session.stream({"prompt": "what did I say?"}):
...                 print(chunk)

The same names are importable from :mod:`ppio_sandbox.agent_runtime` (lazily).
Errors are the shared tree of :mod:`ppio_sandbox.agent_runtime.errors`,
re-exported here: the client raises the class the server named.

Layout: ``_client`` (AgentRuntimeClient), ``_session`` (SandboxSession), ``_pool``
(SessionPool: the supervisor's warm sessions; ``_pool_stream``, a pooled turn's chunks),
``_invocation`` (replies and streams), ``_connection`` (httpx pool, deadlines,
error mapping), ``_owners`` (straight to a session's owner node), ``_retry`` (when
to retry, retry budget), ``_auth`` (Bearer/HMAC),
``_templates`` (TTL cache, deploy; archives from ``agent_runtime.packaging``),
``_models`` (views, encoding once), ``_config``, ``_sync``, ``_sync_session`` and
``_sync_pool`` (the blocking facade).
"""

from __future__ import annotations

from ppio_sandbox.agent_runtime.errors import (
    AuthenticationError,
    IdempotencyConflictError,
    InvocationCancelledError,
    InvocationError,
    InvocationTimeoutError,
    NotFoundError,
    PermissionDeniedError,
    PPIOAgentRuntimeError,
    RequestTooLargeError,
    SandboxCrashedError,
    ServiceUnavailableError,
    SessionBusyError,
    SessionNotFoundError,
    TemplateNotFoundError,
    TooManyRequestsError,
    ValidationError,
)
from ppio_sandbox.agent_runtime.protocol import InvocationRequest, InvocationResponse

from ._auth import AuthManager
from ._client import AgentRuntimeClient
from ._config import ClientConfig
from ._invocation import InvocationStream
from ._models import AgentTemplate, SessionInfo, Strategy
from ._pool import PoolStats, PoolTimeoutError, SessionPool
from ._pool_stream import PoolStream
from ._retry import RetryBudget, RetryPolicy
from ._session import SandboxSession
from ._sync import SyncAgentRuntimeClient
from ._sync_pool import SyncSessionPool
from ._sync_session import SyncInvocationStream, SyncSandboxSession
from ._templates import TemplateManager

__all__ = [
    "AgentRuntimeClient",
    "AgentTemplate",
    "AuthManager",
    "AuthenticationError",
    "ClientConfig",
    "IdempotencyConflictError",
    "InvocationCancelledError",
    "InvocationError",
    "InvocationRequest",
    "InvocationResponse",
    "InvocationStream",
    "InvocationTimeoutError",
    "NotFoundError",
    "PPIOAgentRuntimeError",
    "PermissionDeniedError",
    "PoolStats",
    "PoolStream",
    "PoolTimeoutError",
    "RequestTooLargeError",
    "RetryBudget",
    "RetryPolicy",
    "SandboxCrashedError",
    "SandboxSession",
    "ServiceUnavailableError",
    "SessionBusyError",
    "SessionInfo",
    "SessionNotFoundError",
    "SessionPool",
    "Strategy",
    "SyncAgentRuntimeClient",
    "SyncInvocationStream",
    "SyncSandboxSession",
    "SyncSessionPool",
    "TemplateManager",
    "TemplateNotFoundError",
    "TooManyRequestsError",
    "ValidationError",
]
