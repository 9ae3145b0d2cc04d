"""When and how long to wait before sending a failed request again.

A request is retried only when that cannot do a piece of work twice:

- the connection could not be opened (the server never saw the request);
- the server answered 429 (mailbox full) or 503 (not ready, shutting down):
  it refused the request before acting on it;
- for an *idempotent* request (reads, and invocations, which always carry an
  ``Idempotency-Key`` the server deduplicates on) also 502, 504 and a
  connection lost after sending.

The wait is exponential backoff with full jitter (``uniform(0, min(cap,
base * 2**attempt))``), or the server's ``Retry-After`` when it gives one; a
retry that could not finish before the call's deadline is not attempted, and
the last failure is returned instead. The caller replays the *same* encoded
body and ``Idempotency-Key`` on every attempt.

The supervisor (pool, retry budget, stream resumption) builds on this module.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import httpx

__all__ = ["RetryPolicy", "parse_retry_after", "send_with_retries"]

_ALWAYS_RETRYABLE = frozenset({429, 503})
_IDEMPOTENT_RETRYABLE = frozenset({429, 502, 503, 504})
_MAX_RETRY_AFTER = 60.0


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header given in seconds (dates are ignored).

    >>> parse_retry_after("2"), parse_retry_after("soon"), parse_retry_after(None)
    (2.0, None, None)
    """
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, _MAX_RETRY_AFTER)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How many times to retry and how long to wait in between.

    >>> policy = RetryPolicy(max_retries=3, base=0.1, cap=1.0, rng=lambda: 1.0)
    >>> [policy.delay(n) for n in range(5)]
    [0.1, 0.2, 0.4, 0.8, 1.0]
    >>> policy.delay(0, retry_after=2.5)
    2.5
    """

    max_retries: int = 3
    base: float = 0.2
    cap: float = 10.0
    rng: Callable[[], float] = random.random

    def retryable_status(self, status: int, *, idempotent: bool) -> bool:
        """Whether a reply with ``status`` is worth sending again."""
        return status in (_IDEMPOTENT_RETRYABLE if idempotent else _ALWAYS_RETRYABLE)

    def retryable_error(self, exc: Exception, *, idempotent: bool) -> bool:
        """Whether a transport failure is worth sending again."""
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            return True  # never reached the server
        if isinstance(exc, httpx.UnsupportedProtocol):
            return False  # a configuration error: retrying cannot help
        return idempotent  # sent, maybe acted on: only safe when the server deduplicates

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``attempt + 1`` (full jitter)."""
        if retry_after is not None:
            return retry_after
        return self.rng() * min(self.cap, self.base * 2.0**attempt)


async def send_with_retries(
    send: Callable[[], Awaitable[httpx.Response]],
    policy: RetryPolicy,
    *,
    idempotent: bool,
    deadline: float = math.inf,
) -> httpx.Response:
    """Call ``send`` until it gives a reply not worth retrying; return that reply.

    ``send`` makes one attempt (a new request each time, so it is signed
    afresh). A reply whose status is retryable but out of attempts or time is
    returned for the caller to turn into an error; a transport error in that
    case is raised. ``deadline`` is in ``anyio.current_time()`` terms.
    """
    attempt = 0
    while True:
        try:
            response = await send()
        except httpx.TransportError as exc:
            if attempt >= policy.max_retries or not policy.retryable_error(
                exc, idempotent=idempotent
            ):
                raise
            wait = policy.delay(attempt)
            if anyio.current_time() + wait >= deadline:
                raise
        else:
            if attempt >= policy.max_retries or not policy.retryable_status(
                response.status_code, idempotent=idempotent
            ):
                return response
            wait = policy.delay(attempt, parse_retry_after(response.headers.get("retry-after")))
            if anyio.current_time() + wait >= deadline:
                return response
            await response.aclose()
        await anyio.sleep(wait)
        attempt += 1
