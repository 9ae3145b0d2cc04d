"""The agent-side SDK: wrap agent logic as an HTTP service.

>>> from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp, RequestContext
>>> app = PPIOAgentRuntimeApp()
>>> @app.entrypoint
... async def agent(request: dict, context: RequestContext) -> dict:
...     return {"response": f"Processed: {request.get('query', '')}"}

The client names (``AgentRuntimeClient``, ``ClientConfig``, ``SandboxSession``,
``AuthManager``, ``TemplateManager``, ...) are re-exported from
:mod:`ppio_sandbox.client` lazily, on first access, so code running inside a
sandbox never imports httpx. So are ``PPIOAgentRuntimeServer`` (the HTTP
server as an object, :mod:`.server`) and ``__version__`` (the installed
distribution's version). The data models (wire types, configuration, views)
are gathered in :mod:`ppio_sandbox.agent_runtime.models`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .app import AgentRuntimeApp, PPIOAgentRuntimeApp
from .config import AgentConfig
from .context import RequestContext, SessionStateStore
from .errors import (
    AuthenticationError,
    IdempotencyConflictError,
    InvocationCancelledError,
    InvocationError,
    InvocationTimeoutError,
    MethodNotAllowedError,
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
    UnsupportedMediaTypeError,
    ValidationError,
)
from .protocol import InvocationRequest, InvocationResponse, PingResponse, PingStatus

if TYPE_CHECKING:
    from .server import PPIOAgentRuntimeServer

DISTRIBUTION = "ppio-agent-runtime"

# Names served by ppio_sandbox.client, imported on first access.
_CLIENT_NAMES = frozenset(
    {
        "AgentRuntimeClient",
        "AuthManager",
        "ClientConfig",
        "SandboxSession",
        "SessionPool",
        "SyncAgentRuntimeClient",
        "TemplateManager",
    }
)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        globals()[name] = value = _version()
        return value
    if name == "PPIOAgentRuntimeServer":
        from .server import PPIOAgentRuntimeServer

        globals()[name] = PPIOAgentRuntimeServer
        return PPIOAgentRuntimeServer
    if name in _CLIENT_NAMES:
        client = importlib.import_module("ppio_sandbox.client")
        try:
            value = getattr(client, name)
        except AttributeError:
            raise ImportError(
                f"{name} is not provided by this version of ppio_sandbox.client"
            ) from None
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AgentConfig",
    "AgentRuntimeApp",
    "AuthenticationError",
    "IdempotencyConflictError",
    "InvocationCancelledError",
    "InvocationError",
    "InvocationRequest",
    "InvocationResponse",
    "InvocationTimeoutError",
    "MethodNotAllowedError",
    "NotFoundError",
    "PPIOAgentRuntimeApp",
    "PPIOAgentRuntimeError",
    "PPIOAgentRuntimeServer",
    "PermissionDeniedError",
    "PingResponse",
    "PingStatus",
    "RequestContext",
    "RequestTooLargeError",
    "SandboxCrashedError",
    "ServiceUnavailableError",
    "SessionBusyError",
    "SessionNotFoundError",
    "SessionStateStore",
    "TemplateNotFoundError",
    "TooManyRequestsError",
    "UnsupportedMediaTypeError",
    "ValidationError",
    "__version__",
]
