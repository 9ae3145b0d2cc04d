"""When and how long to wait before sending a failed request again, and how often.

A request is retried only when that cannot do a piece of work twice:

- the connection could not be opened (the server never saw the request);
- the server answered 429 (mailbox full) or 503 (not ready, shutting down):
  it refused the request before acting on it;
- for an *idempotent* request (reads, and invocations, which always carry an
  ``Idempotency-Key`` the server deduplicates on) also 502, 504 and a
  connection lost after sending (before or while the reply was read) --
  except a 504 whose envelope says the turn itself ran out of time
  (``InvocationTimeoutError``): a replay would only get that stored verdict.

The wait is exponential backoff with full jitter (``uniform(0, min(cap,
base * 2**attempt))``), or the server's ``Retry-After`` when it gives one
(capped at 60 s); a retry that could not finish before the call's deadline
is not attempted, and the last failure is returned instead. The caller
replays the *same* encoded body and ``Idempotency-Key`` on every attempt.

How often is the :class:`RetryBudget`'s business: one per client, it keeps
retries a small fraction of calls, so a failing server sees no retry storm.
A retry the budget refuses is not made either. :class:`RetryState` is one
call's count of attempts; a resumed stream (``_invocation.py``) keeps
spending from it.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import httpx

from ppio_sandbox.agent_runtime.errors import InvocationTimeoutError

from ._models import decode_reply

__all__ = ["RetryBudget", "RetryPolicy", "RetryState", "parse_retry_after", "send_with_retries"]

logger = logging.getLogger("ppio_sandbox.client")

_ALWAYS_RETRYABLE = frozenset({429, 503})
_IDEMPOTENT_RETRYABLE = frozenset({429, 502, 503, 504})
_MAX_RETRY_AFTER = 60.0
_UNIT = 1_000_000  # tokens are counted in millionths, so that ten deposits of 0.1 make 1
_QUIET = 1.0  # seconds without a refused retry before the reserve is used (and refills) again


def is_turn_timeout(response: httpx.Response) -> bool:
    """Whether ``response`` is the server's 504 for a turn that ran out of time.

    Its envelope names :class:`InvocationTimeoutError`; a gateway's 504 (no
    envelope, or a body not read yet) does not, and stays retryable.

    >>> body = b'{"error": {"type": "InvocationTimeoutError", "message": "too slow"}}'
    >>> is_turn_timeout(httpx.Response(504, content=body))
    True
    >>> is_turn_timeout(httpx.Response(504, text="upstream timed out"))
    False
    """
    if response.status_code != InvocationTimeoutError.status_code:
        return False
    try:
        body = decode_reply(response)
    except Exception:  # not read (a stream), not our envelope
        return False
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and error.get("type") == InvocationTimeoutError.__name__


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header given in seconds (dates are ignored).

    >>> parse_retry_after("2"), parse_retry_after("soon"), parse_retry_after(None)
    (2.0, None, None)
    >>> parse_retry_after("3600")  # capped
    60.0
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


class RetryBudget:
    """A token bucket that keeps retries a fraction of calls (as Finagle and gRPC do).

    Every call's first attempt deposits ``ratio`` of a token; every retry
    withdraws a whole one, and is not made when none is left. So under a
    steady outage at most ``ratio`` extra requests per call are sent. Deposits
    are capped at ``max_tokens``, which bounds the burst of retries a client
    that was healthy for long can send when the server starts failing.

    A *reserve* of ``min_tokens``, refilled in a second, lets a quiet client
    (whose deposits are few) still retry a lone failure. It is spent only
    when the deposits are, and deposits pay it back before they fund
    anything else; after a refused retry it is left alone until a second
    passes without one. The reserve therefore lends, but never adds to, the
    ``ratio`` a failing server sees over a sustained run.

    >>> now = [0.0]
    >>> budget = RetryBudget(ratio=0.1, min_tokens=1, clock=lambda: now[0])
    >>> budget.deposit(); budget.try_withdraw()  # a lone failure: the reserve pays
    True
    >>> budget.deposit(); budget.try_withdraw()  # a second one at once: refused
    False
    >>> for _ in range(10):
    ...     budget.deposit()  # ten calls: the reserve is repaid, 0.2 token saved
    >>> budget.try_withdraw()  # and it rests while retries are being refused
    False
    >>> now[0] = 2.0  # a quiet second later, the reserve is in use again
    >>> budget.try_withdraw(), round(budget.tokens, 6)
    (True, 0.2)
    """

    def __init__(
        self,
        ratio: float = 0.1,
        min_tokens: float = 3.0,
        max_tokens: float = 100.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (math.isfinite(ratio) and ratio >= 0):
            raise ValueError(f"retry budget ratio must be a number >= 0, got {ratio!r}")
        if not (math.isfinite(min_tokens) and min_tokens >= 0):
            raise ValueError(f"retry budget min_tokens must be a number >= 0, got {min_tokens!r}")
        if not (math.isfinite(max_tokens) and max_tokens >= 1):
            raise ValueError(f"retry budget max_tokens must be a number >= 1, got {max_tokens!r}")
        self.ratio = ratio
        self.min_tokens = min_tokens
        self.max_tokens = max_tokens
        self._clock = clock
        self._deposit = round(ratio * _UNIT)
        self._reserve_cap = round(min_tokens * _UNIT)
        self._bank_cap = round(max_tokens * _UNIT)
        self._reserve = self._reserve_cap
        self._bank = 0
        self._refused_at = -math.inf
        self._last = clock()
        self.deposits = 0
        self.withdrawals = 0
        self.refusals = 0

    def __repr__(self) -> str:
        return (
            f"RetryBudget(ratio={self.ratio}, min_tokens={self.min_tokens}, "
            f"max_tokens={self.max_tokens}, tokens={self.tokens:.2f})"
        )

    @property
    def tokens(self) -> float:
        """Whole and partial retries available now (deposits plus the usable reserve)."""
        now = self._settle()
        usable = self._reserve if self._reserve_usable(now) else 0
        return (self._bank + usable) / _UNIT

    def _reserve_usable(self, now: float) -> bool:
        return now - self._refused_at >= _QUIET

    def _settle(self) -> float:
        """Refill the reserve for the time since the last look (not while it rests)."""
        now = self._clock()
        since = max(self._last, self._refused_at + _QUIET)
        if now > since and self._reserve < self._reserve_cap:
            refill = int((now - since) * self._reserve_cap)  # the whole reserve per second
            self._reserve = min(self._reserve_cap, self._reserve + refill)
        self._last = max(self._last, now)
        return now

    def deposit(self) -> None:
        """Credit a first attempt: repay the reserve first, then save (up to the cap)."""
        self._settle()
        self.deposits += 1
        amount = self._deposit
        owed = min(amount, self._reserve_cap - self._reserve)
        self._reserve += owed
        self._bank = min(self._bank_cap, self._bank + amount - owed)

    def try_withdraw(self) -> bool:
        """Take one token for a retry; False (and the retry is not made) when none is left."""
        now = self._settle()
        if self._bank >= _UNIT:
            self._bank -= _UNIT
        elif self._reserve >= _UNIT and self._reserve_usable(now):
            self._reserve -= _UNIT
        else:
            self._refused_at = now
            self.refusals += 1
            return False
        self.withdrawals += 1
        return True


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


class RetryState:
    """One logical call's retries: the policy, the shared budget, the deadline.

    The first attempt deposits in ``budget`` (when there is one); each retry
    must be allowed by :meth:`next_wait`, which counts it against
    ``max_retries`` and withdraws a token. A resumed stream goes on spending
    from the same state, so the whole call stays within both limits.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        budget: RetryBudget | None = None,
        *,
        idempotent: bool,
        deadline: float = math.inf,
    ) -> None:
        self.policy = policy
        self.budget = budget
        self.idempotent = idempotent
        self.deadline = deadline
        self.retries = 0
        self.attempts = 0

    def next_wait(self, retry_after: float | None = None, *, what: str = "request") -> float | None:
        """Seconds to wait before the next retry, or None when none may be made.

        None when the retries are used up, when the wait would end past the
        deadline, or when the budget is empty (checked last: a retry not
        made spends no token). ``deadline`` is in ``anyio.current_time()`` terms.
        """
        if self.retries >= self.policy.max_retries:
            return None
        wait = self.policy.delay(self.retries, retry_after)
        if anyio.current_time() + wait >= self.deadline:
            return None
        if self.budget is not None and not self.budget.try_withdraw():
            logger.debug("retry budget exhausted: %s not retried (%r)", what, self.budget)
            return None
        self.retries += 1
        return wait

    async def send(self, send: Callable[[], Awaitable[httpx.Response]]) -> httpx.Response:
        """Call ``send`` until it gives a reply not worth retrying; return that reply.

        ``send`` makes one attempt (a new request each time, so it is signed
        afresh). A reply whose status is retryable but out of attempts, time
        or budget is returned for the caller to turn into an error; a
        transport error in that case is raised.
        """
        if self.attempts == 0 and self.budget is not None:
            self.budget.deposit()
        while True:
            self.attempts += 1
            try:
                response = await send()
            except httpx.TransportError as exc:
                if not self.policy.retryable_error(exc, idempotent=self.idempotent):
                    raise
                wait = self.next_wait(what=f"{type(exc).__name__}")
                if wait is None:
                    raise
            else:
                status = response.status_code
                if not self.policy.retryable_status(
                    status, idempotent=self.idempotent
                ) or is_turn_timeout(response):
                    return response
                retry_after = parse_retry_after(response.headers.get("retry-after"))
                wait = self.next_wait(retry_after, what=f"HTTP {status}")
                if wait is None:
                    return response
                await response.aclose()
            await anyio.sleep(wait)


async def send_with_retries(
    send: Callable[[], Awaitable[httpx.Response]],
    policy: RetryPolicy,
    *,
    idempotent: bool,
    deadline: float = math.inf,
    budget: RetryBudget | None = None,
) -> httpx.Response:
    """:meth:`RetryState.send` for a call of its own."""
    state = RetryState(policy, budget, idempotent=idempotent, deadline=deadline)
    return await state.send(send)
