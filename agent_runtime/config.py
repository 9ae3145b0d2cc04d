"""Configuration of an agent runtime: one plain object, as hypercorn does it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["BIND_ENV", "AgentConfig"]

_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

BIND_ENV = "PPIO_AGENT_BIND"
"""Environment variable that overrides where the runtime listens:
``unix:/path/to.sock`` or ``host:port``. An orchestrator sets it to start any
agent file on an address of its choosing."""


@dataclass
class AgentConfig:
    """Settings of :class:`PPIOAgentRuntimeApp`.

    >>> AgentConfig(port=9000, timeout=30).timeout
    30

    ``timeout`` bounds each invocation in seconds (``None`` or ``0``: no
    bound); ``max_request_size`` is in bytes; ``cors_origins`` lists the
    origins allowed to call the runtime from a browser (empty: no CORS
    headers); ``backend`` is the event loop the server runs on.

    ``host`` defaults to loopback (``127.0.0.1``): only this machine can call
    the runtime until ``host="0.0.0.0"`` (or ``bind``) exposes it, e.g. in a
    container. An orchestrator picks the address itself (``$PPIO_AGENT_BIND``).
    """

    host: str = "127.0.0.1"
    port: int = 8080
    timeout: float | None = 300
    max_request_size: int = 1024 * 1024
    cors_origins: list[str] = field(default_factory=list)
    debug: bool = False
    log_level: str | None = None
    """Logging level; unset means INFO, or DEBUG when ``debug`` is on."""
    backend: Literal["asyncio", "trio"] = "asyncio"
    server: Literal["hypercorn", "uvicorn"] = "hypercorn"
    graceful_timeout: float = 30.0
    keep_alive_timeout: float = 75.0
    max_session_states: int = 1024
    bind: str | None = None
    """Explicit bind address (``unix:/p`` or ``host:port``); wins over host/port."""

    def __post_init__(self) -> None:
        if self.max_request_size <= 0:
            raise ValueError("max_request_size must be positive")
        if self.timeout is not None and self.timeout < 0:
            raise ValueError("timeout must be >= 0 (0 or None: no timeout)")
        if self.backend not in ("asyncio", "trio"):
            raise ValueError(f"backend must be 'asyncio' or 'trio', not {self.backend!r}")
        if self.server not in ("hypercorn", "uvicorn"):
            raise ValueError(f"server must be 'hypercorn' or 'uvicorn', not {self.server!r}")
        if self.log_level is not None and self.log_level.upper() not in _LEVELS:
            raise ValueError(
                f"log_level must be one of {', '.join(_LEVELS)}, not {self.log_level!r}"
            )
        if self.max_session_states < 1:
            raise ValueError("max_session_states must be >= 1")

    @property
    def invocation_timeout(self) -> float | None:
        return self.timeout or None

    def resolve_bind(self) -> str:
        """Where to listen: ``$PPIO_AGENT_BIND``, else ``bind``, else ``host:port``."""
        env = os.environ.get(BIND_ENV)
        if env:
            return env
        if self.bind:
            return self.bind
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"
