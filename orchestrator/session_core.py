"""The session's state machine, free of I/O.

:class:`SessionCore` decides; the actor task around it (``actor.py``) only
moves messages and runs turns in the sandbox. Time comes from an injected
clock, so every transition and deadline is tested without sockets or sleeps.

States::

    starting -> ready <-> busy
                  |  \\      |
                  v   v     v
               paused  closing -> closed
                          (any) -> failed

Turns run one at a time, in arrival order. Per turn a strategy:
``enqueue`` (default: wait in the mailbox), ``reject`` (409 when a turn is
running or waiting), ``interrupt`` (cancel the running turn, then run this
one next). A full mailbox answers 429.

Idempotency: every turn has a key. A finished key replays its stored reply; a
key still queued or running is joined; the same key with another body is a
422. The cache keeps at most ``idempotency_max`` finished turns (oldest
evicted first) for at most ``idempotency_ttl`` seconds after they finish.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from ppio_sandbox.agent_runtime.errors import (
    IdempotencyConflictError,
    InvocationCancelledError,
    PPIOAgentRuntimeError,
    ServiceUnavailableError,
    SessionBusyError,
    SessionNotFoundError,
    TooManyRequestsError,
    ValidationError,
)

__all__ = [
    "Admission",
    "SessionCore",
    "SessionLimits",
    "SessionState",
    "Strategy",
    "Turn",
    "TurnOutcome",
]

Clock = Callable[[], float]


class SessionState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    PAUSED = "paused"
    CLOSING = "closing"
    CLOSED = "closed"
    FAILED = "failed"


_ENDED = (SessionState.CLOSING, SessionState.CLOSED, SessionState.FAILED)


class Strategy(enum.StrEnum):
    ENQUEUE = "enqueue"
    REJECT = "reject"
    INTERRUPT = "interrupt"

    @classmethod
    def parse(cls, value: str | None) -> Strategy:
        if not value:
            return cls.ENQUEUE
        try:
            return cls(value.lower())
        except ValueError:
            raise ValidationError(
                f"unknown strategy {value!r}; use enqueue, reject or interrupt"
            ) from None


class TurnOutcome(enum.StrEnum):
    OK = "ok"
    ERROR = "error"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    CRASHED = "crashed"


class Turn:
    """One invocation: what was asked, and (once known) how it ended.

    The reply is recorded here so a replay can be served: ``result`` for a
    plain reply, ``events`` (the chunks so far) for a stream, ``error`` for a
    failure. Only :class:`SessionCore` writes these (its transitions raise
    :class:`IllegalTransition` when a turn is not in the state they need);
    everyone else reads them.

    ``cancel``, ``listeners``, ``readers`` and ``acked`` belong to the I/O
    layer (the actor and the HTTP readers): the core never touches them.
    """

    __slots__ = (
        "acked",
        "body_hash",
        "cancel",
        "change",
        "error",
        "events",
        "finished_at",
        "key",
        "listeners",
        "outcome",
        "payload",
        "readers",
        "request_id",
        "result",
        "started_at",
        "stop_error",
        "strategy",
        "streaming",
        "submitted_at",
        "wire",
    )

    def __init__(
        self,
        key: str,
        body_hash: bytes,
        payload: dict[str, Any],
        *,
        request_id: str,
        submitted_at: float,
    ) -> None:
        self.key = key
        self.body_hash = body_hash
        self.payload = payload
        self.request_id = request_id
        self.submitted_at = submitted_at
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.result: Any = None
        self.error: PPIOAgentRuntimeError | None = None
        self.outcome: TurnOutcome | None = None
        self.stop_error: PPIOAgentRuntimeError | None = None  # why it is being stopped
        self.strategy: Strategy | None = None  # set when admitted (None: restored)
        self.streaming = False
        self.events: Sequence[Any] = _NO_EVENTS  # a list of its own once it streams
        self.wire: bytes | None = None  # the checkpoint's encoding, once done
        self.change = 0  # the session's change count when it finished (durability)
        self.acked = 0  # events the live reader has consumed (backpressure)
        self.readers = 0  # callers currently waiting on or reading this turn
        # Set by the actor: a callable that cancels the turn while it runs,
        # and the waiters to wake when it changes (I/O objects, opaque here).
        self.cancel: Callable[[], None] | None = None
        self.listeners: Any = None

    @property
    def done(self) -> bool:
        return self.finished_at is not None

    @property
    def running(self) -> bool:
        return self.started_at is not None and self.finished_at is None


_DONE: dict[str, Any] = {}  # the payload of every finished turn (never written to)
_NO_EVENTS: tuple[Any, ...] = ()  # the events of every turn that does not stream


class IllegalTransition(RuntimeError):
    """A session or turn was asked for a change its state does not allow (a bug)."""


class Admission(enum.Enum):
    """What :meth:`SessionCore.admit` decided."""

    QUEUED = "queued"  # a new turn, in the mailbox
    RUN = "run"  # a new turn of an idle session, taken at once: the caller runs it
    REPLAY = "replay"  # a finished turn with this key: serve its stored reply
    JOIN = "join"  # the same key is queued or running: wait for it


class SessionLimits:
    """Per-session bounds (one object shared by many sessions)."""

    __slots__ = (
        "idempotency_max",
        "idempotency_ttl",
        "mailbox_size",
        "max_lifetime_seconds",
        "restart_budget",
        "restart_window",
        "timeout_seconds",
    )

    def __init__(
        self,
        *,
        timeout_seconds: float = 900.0,
        max_lifetime_seconds: float = 8 * 3600.0,
        mailbox_size: int = 64,
        idempotency_max: int = 128,
        idempotency_ttl: float = 3600.0,
        restart_budget: int = 3,
        restart_window: float = 60.0,
    ) -> None:
        if timeout_seconds <= 0 or max_lifetime_seconds <= 0:
            raise ValueError("timeouts must be positive")
        if mailbox_size < 1 or idempotency_max < 1:
            raise ValueError("mailbox_size and idempotency_max must be >= 1")
        self.timeout_seconds = timeout_seconds
        self.max_lifetime_seconds = max_lifetime_seconds
        self.mailbox_size = mailbox_size
        self.idempotency_max = idempotency_max
        self.idempotency_ttl = idempotency_ttl
        self.restart_budget = restart_budget
        self.restart_window = restart_window


DEFAULT_LIMITS = SessionLimits()


class SessionCore:
    """Everything a session decides, with time from ``clock``.

    Lazily allocated containers keep an idle session small: the mailbox,
    idempotency cache and restart history exist only once used.
    """

    __slots__ = (
        "_cache",
        "_mailbox",
        "_restarts",
        "created_at",
        "end_reason",
        "last_activity",
        "limits",
        "running",
        "session_id",
        "state",
        "timeout_seconds",
        "turns_failed",
        "turns_ok",
    )

    def __init__(
        self,
        session_id: str,
        *,
        now: float,
        limits: SessionLimits = DEFAULT_LIMITS,
        timeout_seconds: float | None = None,
    ) -> None:
        self.session_id = session_id
        self.limits = limits
        self.state = SessionState.STARTING
        self.created_at = now
        self.last_activity = now
        if timeout_seconds is not None and not timeout_seconds > 0:
            raise ValueError("timeout_seconds must be positive")
        self.timeout_seconds = timeout_seconds or limits.timeout_seconds
        self.end_reason: str | None = None
        self.running: Turn | None = None
        self.turns_ok = 0
        self.turns_failed = 0
        self._mailbox: deque[Turn] | None = None
        self._cache: dict[str, Turn] | None = None  # insertion-ordered: oldest first
        self._restarts: deque[float] | None = None

    # -- lifecycle ----------------------------------------------------------

    def started(self, now: float) -> None:
        """The sandbox is up: starting -> ready."""
        if self.state is not SessionState.STARTING:
            raise IllegalTransition(f"session {self.session_id}: started() while {self.state}")
        self.state = SessionState.READY
        self.last_activity = now

    @property
    def ended(self) -> bool:
        return self.state in _ENDED

    @property
    def queued(self) -> int:
        return len(self._mailbox) if self._mailbox else 0

    def check_alive(self) -> None:
        """Raise SessionNotFoundError naming why the session ended."""
        if self.state in _ENDED:
            raise SessionNotFoundError(f"session {self.session_id} {self.end_reason or 'closed'}")

    def deadline(self) -> float:
        """When the session expires if nothing happens (idle or lifetime)."""
        lifetime = self.created_at + self.limits.max_lifetime_seconds
        if self.state is not SessionState.PAUSED and (self.running is not None or self.queued):
            return lifetime  # active sessions do not go idle
        return min(lifetime, self.last_activity + self.timeout_seconds)

    def expiry_reason(self, now: float) -> str | None:
        """Why the session should end now, or None."""
        if self.state in _ENDED:
            return None
        if now >= self.created_at + self.limits.max_lifetime_seconds:
            return f"reached its maximum lifetime ({self.limits.max_lifetime_seconds:g} s)"
        # A paused session idles out too: holding its mailbox is not activity.
        idle = self.state is SessionState.PAUSED or (self.running is None and not self.queued)
        if idle and now >= self.last_activity + self.timeout_seconds:
            return f"expired after {self.timeout_seconds:g} s idle"
        return None

    def set_timeout(self, seconds: float, now: float) -> None:
        """New idle timeout, counted from now."""
        self.check_alive()
        if not seconds > 0:
            raise ValidationError("timeout_seconds must be a positive number")
        self.timeout_seconds = float(seconds)
        self.last_activity = now

    def touch(self, now: float) -> None:
        self.last_activity = now

    def pause(self, now: float) -> None:
        self.check_alive()
        if self.state is SessionState.STARTING:
            raise ServiceUnavailableError(f"session {self.session_id} is still starting")
        self.state = SessionState.PAUSED
        self.last_activity = now

    def resume(self, now: float) -> None:
        self.check_alive()
        if self.state is SessionState.PAUSED:
            self.state = SessionState.BUSY if self.running else SessionState.READY
        self.last_activity = now

    @property
    def paused(self) -> bool:
        return self.state is SessionState.PAUSED

    def begin_close(
        self,
        reason: str,
        now: float | None = None,
        error: type[PPIOAgentRuntimeError] = SessionNotFoundError,
    ) -> list[Turn]:
        """Start closing (-> closing).

        The turns waiting in the mailbox will never run: they finish now with
        ``error`` (outcome cancelled) and are returned, for their callers to
        be woken. A running turn is asked to stop with the same error
        (:meth:`stop`); the caller cancels it. A second call does nothing.
        """
        if self.state in _ENDED:
            return []
        self.state = SessionState.CLOSING
        self.end_reason = reason
        return self._end_turns(error(f"session {self.session_id} {reason}"), now)

    def closed(self) -> None:
        """Closing (or failed) -> closed; a failed session stays failed."""
        if self.state is SessionState.FAILED:
            return
        if self.state is not SessionState.CLOSING and self.state is not SessionState.CLOSED:
            raise IllegalTransition(f"session {self.session_id}: closed() while {self.state}")
        self.state = SessionState.CLOSED

    def fail(
        self,
        reason: str,
        now: float | None = None,
        error: type[PPIOAgentRuntimeError] = ServiceUnavailableError,
    ) -> list[Turn]:
        """End as failed (-> failed); like :meth:`begin_close` for the turns."""
        if self.state in _ENDED:
            return []
        self.state = SessionState.FAILED
        self.end_reason = reason
        return self._end_turns(error(f"session {self.session_id} {reason}"), now)

    def _end_turns(self, error: PPIOAgentRuntimeError, now: float | None) -> list[Turn]:
        when = self.last_activity if now is None else now
        pending = list(self._mailbox or ())
        self._mailbox = None
        for turn in pending:
            turn.error = error
            turn.outcome = TurnOutcome.CANCELLED
            turn.finished_at = when
            self._forget(turn)  # it never ran: a retry elsewhere must run it
        if self.running is not None:
            self.stop(self.running, error)
        return pending

    def sandbox_crashed(self, now: float) -> bool:
        """Record a crash; True if a restart is within budget."""
        if self._restarts is None:
            self._restarts = deque()
        window_start = now - self.limits.restart_window
        while self._restarts and self._restarts[0] < window_start:
            self._restarts.popleft()
        if len(self._restarts) >= self.limits.restart_budget:
            return False
        self._restarts.append(now)
        return True

    @property
    def restarts(self) -> int:
        return len(self._restarts) if self._restarts else 0

    # -- turns --------------------------------------------------------------

    def admit(
        self, turn: Turn, strategy: Strategy, now: float
    ) -> tuple[Admission, Turn, Turn | None]:
        """Decide what happens to a new invocation.

        Returns ``(admission, turn, to_cancel)``: the turn to wait on (the new
        one, or the cached one for a replay or join) and, for ``interrupt``,
        the running turn to cancel. Raises the 404/409/422/429 errors.
        """
        self.check_alive()
        cached = self._cached(turn.key, now)
        if cached is not None:
            if cached.body_hash != turn.body_hash:
                raise IdempotencyConflictError(
                    f"Idempotency-Key {turn.key!r} was used with a different body"
                )
            return (Admission.REPLAY if cached.done else Admission.JOIN), cached, None
        turn.strategy = strategy
        busy = self.running is not None or self.queued > 0
        to_cancel: Turn | None = None
        if busy and strategy is Strategy.REJECT:
            raise SessionBusyError(
                f"session {self.session_id} is busy ({'a turn is running' if self.running else ''}"
                f"{', ' if self.running and self.queued else ''}"
                f"{f'{self.queued} queued' if self.queued else ''}); strategy=reject"
            )
        if self.queued >= self.limits.mailbox_size:
            raise TooManyRequestsError(
                f"session {self.session_id} has {self.queued} turns waiting",
                retry_after=1.0,
            )
        if self._mailbox is None:
            self._mailbox = deque()
        if strategy is Strategy.INTERRUPT:
            to_cancel = self.running
            self._mailbox.appendleft(turn)
        else:
            self._mailbox.append(turn)
        self._remember(turn, now)
        self.last_activity = now
        return Admission.QUEUED, turn, to_cancel

    def next_turn(self, now: float) -> Turn | None:
        """The turn to run now, if any (none while paused, busy or ended): queued -> running."""
        if (
            self.running is not None
            or not self._mailbox
            or self.state not in (SessionState.READY, SessionState.BUSY)
        ):
            return None
        turn = self._mailbox.popleft()
        if not self._mailbox:
            self._mailbox = None  # an idle session keeps no empty deque
        self.running = turn
        turn.started_at = now
        self.state = SessionState.BUSY
        return turn

    def _check_running(self, turn: Turn, what: str) -> None:
        if self.running is not turn or turn.finished_at is not None:
            raise IllegalTransition(
                f"session {self.session_id}: {what} for turn {turn.key!r}, which is not running"
            )

    def stream_started(self, turn: Turn) -> None:
        """The running turn's reply is a stream (its chunks follow)."""
        self._check_running(turn, "stream_started()")
        turn.streaming = True
        turn.events = []

    def add_chunk(self, turn: Turn, chunk: Any) -> int:
        """One more chunk of the running stream; returns how many there are."""
        if not turn.streaming or turn.finished_at is not None:
            raise IllegalTransition(f"session {self.session_id}: chunk for a turn not streaming")
        events = turn.events
        assert isinstance(events, list)
        events.append(chunk)
        return len(events)

    def stop(self, turn: Turn, error: PPIOAgentRuntimeError) -> bool:
        """Ask the running turn to stop, failing with ``error``.

        True if the caller should now cancel it (the first request wins);
        False if it is not running or already stopping.
        """
        if self.running is not turn or turn.finished_at is not None or turn.stop_error:
            return False
        turn.stop_error = error
        return True

    def finish(
        self,
        turn: Turn,
        outcome: TurnOutcome,
        now: float,
        *,
        result: Any = None,
        error: PPIOAgentRuntimeError | None = None,
    ) -> None:
        """Record the end of the running turn: running -> done.

        A turn that was asked to :meth:`stop` and then cancelled ends with
        the stop's error (outcome cancelled).
        """
        if turn.finished_at is not None or turn.started_at is None:
            raise IllegalTransition(
                f"session {self.session_id}: finish() of turn {turn.key!r}, which is not running"
            )
        if outcome is TurnOutcome.CANCELLED and error is None:
            error = turn.stop_error
        turn.outcome = outcome
        turn.result = result
        turn.error = error
        turn.finished_at = now
        turn.payload = _DONE  # a replay compares body hashes; the body itself is not kept
        if outcome is TurnOutcome.OK:
            self.turns_ok += 1
        else:
            self.turns_failed += 1
        if outcome is TurnOutcome.CRASHED:
            # The sandbox died under it: a retry with the same key must run
            # it again on the restarted sandbox, not replay the 502.
            self._forget(turn)
        if self.running is turn:
            self.running = None
            if self.state is SessionState.BUSY:
                self.state = SessionState.READY
        self.last_activity = now

    def cancel_queued(self, turn: Turn, now: float) -> bool:
        """Drop a turn still waiting in the mailbox (its caller went away)."""
        if self._mailbox and turn in self._mailbox:
            self._mailbox.remove(turn)
            if not self._mailbox:
                self._mailbox = None
            self._forget(turn)  # it never ran: a retry must run it, not replay this
            turn.error = InvocationCancelledError("the caller went away before the turn ran")
            turn.outcome = TurnOutcome.CANCELLED
            turn.finished_at = now
            return True
        return False

    # -- idempotency cache --------------------------------------------------

    def _cached(self, key: str, now: float) -> Turn | None:
        cache = self._cache
        if not cache:
            return None
        self._evict(now)
        hit = cache.get(key)
        # Turns finish out of admission order (interrupt, cancel_queued), so
        # _evict may stop before an expired entry: check the one found.
        finished = hit.finished_at if hit is not None else None
        if finished is not None and now - finished >= self.limits.idempotency_ttl:
            del cache[key]
            return None
        return hit

    def _forget(self, turn: Turn) -> None:
        if self._cache is not None and self._cache.get(turn.key) is turn:
            del self._cache[turn.key]

    def _remember(self, turn: Turn, now: float) -> None:
        if self._cache is None:
            self._cache = {}
        self._cache[turn.key] = turn
        self._evict(now)

    def _evict(self, now: float) -> None:
        cache = self._cache
        assert cache is not None
        limit, ttl = self.limits.idempotency_max, self.limits.idempotency_ttl
        # Oldest first, stopping at the first entry to keep (no copy of the
        # cache: this runs twice per turn). Unfinished turns are never
        # evicted: they can be joined.
        doomed: list[str] = []
        size = len(cache)
        for key, old in cache.items():
            over = size > limit
            finished = old.finished_at
            if finished is not None and (over or now - finished >= ttl):
                doomed.append(key)
                size -= 1
            elif not over:
                break
        for key in doomed:
            del cache[key]

    def knows(self, key: str, now: float) -> bool:
        """Whether a turn with ``key`` is queued, running or still remembered."""
        return self._cached(key, now) is not None

    @property
    def cached_turns(self) -> int:
        return len(self._cache) if self._cache else 0

    def finished_turns(self, limit: int) -> list[Turn]:
        """The ``limit`` most recently admitted turns that have finished (oldest first)."""
        if not self._cache:
            return []
        done = [turn for turn in self._cache.values() if turn.finished_at is not None]
        return done[-limit:]

    # -- checkpoints --------------------------------------------------------

    @classmethod
    def restored(
        cls,
        session_id: str,
        *,
        created_at: float,
        last_activity: float,
        timeout_seconds: float,
        limits: SessionLimits = DEFAULT_LIMITS,
        turns_ok: int = 0,
        turns_failed: int = 0,
        turns: list[Turn] | None = None,
    ) -> SessionCore:
        """A session brought back from a checkpoint (times on this node's clock).

        It starts like a new one (``started`` follows once its sandbox is
        up); its finished ``turns`` are remembered so their keys replay.
        """
        core = cls(session_id, now=created_at, limits=limits, timeout_seconds=timeout_seconds)
        core.last_activity = last_activity
        core.turns_ok = turns_ok
        core.turns_failed = turns_failed
        for turn in turns or ():
            if turn.finished_at is None:
                raise IllegalTransition(f"session {session_id}: restoring an unfinished turn")
            if core._cache is None:
                core._cache = {}
            core._cache[turn.key] = turn
        return core
