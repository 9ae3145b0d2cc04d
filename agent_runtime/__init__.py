"""The agent-side SDK: wrap agent logic as an HTTP service.

>>> from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp, RequestContext
>>> app = PPIOAgentRuntimeApp()
>>> @app.entrypoint
... async def agent(request: dict, context: RequestContext) -> dict:
...     return {"response": f"Processed: {request.get('query', '')}"}

The client names (``AgentRuntimeClient``, ``ClientConfig``, ...) are
re-exported from :mod:`ppio_sandbox.client` lazily, on first access, so code
running inside a sandbox never imports httpx.
"""

from __future__ import annotations

import importlib
from typing import Any

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

__version__ = "0.1.0"

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


def __getattr__(name: str) -> Any:
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
