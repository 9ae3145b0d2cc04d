"""Client configuration: one plain object, with the environment as a fallback.

>>> config = ClientConfig(base_url="http://127.0.0.1:8900", timeout=60, max_retries=2)
>>> config.timeout, config.wire
(60, 'json')
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "API_KEY_ENV",
    "API_SECRET_ENV",
    "BASE_URL_ENV",
    "DEFAULT_BASE_URL",
    "ClientConfig",
    "resolve_credentials",
    "time_budget",
]

DEFAULT_BASE_URL = "http://127.0.0.1:8900"
BASE_URL_ENV = "PPIO_BASE_URL"
API_KEY_ENV = "PPIO_API_KEY"
API_SECRET_ENV = "PPIO_API_SECRET"

Wire = Literal["json", "msgpack"]


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def time_budget(timeout: float | None, default: float | None) -> float:
    """Seconds a wait may take: ``timeout``, else ``default``; both ``None``: no limit (inf).

    The rule every client wait follows (a call's deadline, a pool's
    acquire); a budget that is not positive raises :class:`ValueError`.
    """
    value = default if timeout is None else timeout
    if value is None:
        return math.inf
    if not value > 0:
        raise ValueError("timeout must be a positive number of seconds")
    return float(value)


def _base_url_from_env() -> str:
    return os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL


@dataclass(frozen=True)
class ClientConfig:
    """How an :class:`AgentRuntimeClient` talks to the orchestrator.

    ``base_url`` defaults to ``$PPIO_BASE_URL``, else ``http://127.0.0.1:8900``.

    Times are seconds. ``timeout`` is the deadline of every call (retries and,
    for a stream, every chunk included); ``None`` means no deadline, and a
    call may pass its own ``timeout`` (``float("inf")``: none for that call).
    ``connect_timeout`` bounds opening a
    connection. Failed calls are retried ``max_retries`` times when that is
    safe (see ``_retry.py``), waiting ``retry_backoff * 2**attempt`` at most
    (capped by ``retry_max_backoff``, full jitter) or what ``Retry-After``
    says. All retries of one client share a retry budget (a token bucket,
    see :class:`RetryBudget`): each call adds ``retry_budget_ratio`` of a
    token (at most ``retry_budget_max_tokens`` are kept), each retry takes
    one, so a failing server sees at most that ratio of extra requests; a
    reserve of ``retry_budget_min_tokens`` per second lets a quiet client
    still retry. ``retry_budget_ratio=None`` turns the budget off (only
    ``max_retries`` bounds retries). ``enable_cache``/``cache_ttl`` govern
    the template cache. ``wire``
    picks the encoding of invocation bodies and replies (``"json"`` or
    ``"msgpack"``; streams are always Server-Sent Events with JSON data).
    ``deploy_timeout`` bounds :meth:`AgentRuntimeClient.deploy_template`'s
    wait for a build. ``headers`` are added to every request.

    ``direct_to_owner``: in a cluster, a node that forwarded a request to the
    node owning its session names that node in the reply
    (``X-PPIO-Owner-URL``); the client then sends that session's later
    requests (turns, streams, ping, pause/resume, timeout, get, close)
    straight there, with the same credentials (an HMAC signature is made
    for the URL used). If the owner cannot be connected to, or answers 421
    or 503, the same request goes at once to ``base_url``, which routes it.
    Requests about no particular session always go to ``base_url``; an
    owner URL that is not ``http(s)``, or is ``http`` while ``base_url`` is
    ``https``, is ignored. ``False``: every request goes to ``base_url``
    (e.g. when the nodes' advertised addresses are not reachable from here).
    """

    base_url: str = field(default_factory=_base_url_from_env)
    timeout: float | None = 300
    max_retries: int = 3
    enable_cache: bool = True
    cache_ttl: float = 300
    connect_timeout: float = 5
    retry_backoff: float = 0.2
    retry_max_backoff: float = 10.0
    retry_budget_ratio: float | None = 0.1
    retry_budget_min_tokens: float = 3.0
    retry_budget_max_tokens: float = 100.0
    wire: Wire = "json"
    max_connections: int = 100
    max_keepalive_connections: int = 20
    deploy_timeout: float = 300
    headers: Mapping[str, str] = field(default_factory=dict)
    direct_to_owner: bool = True

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError("timeout must be a positive number of seconds, or None")
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        for name in ("cache_ttl", "retry_backoff", "retry_max_backoff"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        ratio = self.retry_budget_ratio
        if ratio is not None and not (_finite(ratio) and ratio >= 0):
            raise ValueError(
                f"retry_budget_ratio must be a number >= 0 (extra requests per call), "
                f"or None for no budget; got {ratio!r}"
            )
        if not (_finite(self.retry_budget_min_tokens) and self.retry_budget_min_tokens >= 0):
            raise ValueError(
                f"retry_budget_min_tokens must be a number >= 0, "
                f"got {self.retry_budget_min_tokens!r}"
            )
        if not (_finite(self.retry_budget_max_tokens) and self.retry_budget_max_tokens >= 1):
            raise ValueError(
                f"retry_budget_max_tokens must be a number >= 1 (a retry costs one token), "
                f"got {self.retry_budget_max_tokens!r}"
            )
        for name in ("connect_timeout", "deploy_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.wire not in ("json", "msgpack"):
            raise ValueError(f"wire must be 'json' or 'msgpack', got {self.wire!r}")

    def deadline_seconds(self, timeout: float | None) -> float:
        """A call's time budget: its own ``timeout``, else the configured one (inf: none)."""
        return time_budget(timeout, self.timeout)


def resolve_credentials(
    api_key: str | None, api_secret: str | None, environ: Mapping[str, str] | None = None
) -> tuple[str | None, str | None]:
    """The key and secret to use: the arguments, else ``$PPIO_API_KEY``/``$PPIO_API_SECRET``.

    The environment's secret is only paired with the environment's key: a key
    passed as an argument is never signed with a secret it was not given with.

    >>> resolve_credentials("k", None, {"PPIO_API_KEY": "x", "PPIO_API_SECRET": "y"})
    ('k', None)
    >>> resolve_credentials(None, None, {"PPIO_API_KEY": "x", "PPIO_API_SECRET": "y"})
    ('x', 'y')
    """
    env = os.environ if environ is None else environ
    if api_key is None:
        return env.get(API_KEY_ENV) or None, api_secret or env.get(API_SECRET_ENV) or None
    return api_key, api_secret
