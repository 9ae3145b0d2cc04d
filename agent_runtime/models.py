"""The data models in one place: what goes over the wire, and the views a client gets.

The original SDK's ``Models``. Each name lives in its own module and is
importable from there too; this module only gathers them:

- the runtime's wire types (:mod:`.protocol`): ``InvocationRequest``,
  ``InvocationResponse``, ``PingResponse``, ``PingStatus``;
- its configuration (:mod:`.config`): ``AgentConfig``;
- the client's views and settings (:mod:`ppio_sandbox.client`), loaded on first
  access so an agent importing this module never imports httpx:
  ``AgentTemplate``, ``SessionInfo``, ``ClientConfig``, ``PoolStats``.

>>> from ppio_sandbox.agent_runtime.models import InvocationRequest
>>> InvocationRequest.from_dict({"prompt": "hi", "user": "ada"}).extra
{'user': 'ada'}
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import AgentConfig
from .protocol import InvocationRequest, InvocationResponse, PingResponse, PingStatus

if TYPE_CHECKING:
    from ppio_sandbox.client import AgentTemplate, ClientConfig, PoolStats, SessionInfo

__all__ = [
    "AgentConfig",
    "AgentTemplate",
    "ClientConfig",
    "InvocationRequest",
    "InvocationResponse",
    "PingResponse",
    "PingStatus",
    "PoolStats",
    "SessionInfo",
]

_CLIENT_MODELS = frozenset({"AgentTemplate", "ClientConfig", "PoolStats", "SessionInfo"})


def __getattr__(name: str) -> Any:
    if name in _CLIENT_MODELS:
        value = getattr(importlib.import_module("ppio_sandbox.client"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
