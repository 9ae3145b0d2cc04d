"""Session records and the actor task that runs their turns.

A session is a small record while idle (a virtual actor, as in Orleans): its
actor task is activated by the first message and passivated after
``PASSIVATE_AFTER`` quiet seconds, while the session itself lives on until its
own timeout. While active, the actor is one anyio task owned by the
orchestrator's task group; it takes turns from the session's mailbox one at a
time and runs them in the sandbox.

Callers wait on a :class:`Turn` with :func:`wait_started` and read a stream
with :func:`read_batches`; the actor publishes progress with :func:`notify`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import anyio
import anyio.lowlevel

from ppio_sandbox.agent_runtime._handlers import describe_failure, is_cancellation
from ppio_sandbox.agent_runtime.errors import (
    InvocationError,
    InvocationTimeoutError,
    PPIOAgentRuntimeError,
    SandboxCrashedError,
    ServiceUnavailableError,
)

from . import _tracing
from ._tracing import TurnSpan
from .sandbox.base import Sandbox, TurnCall
from .session_core import SessionCore, Turn, TurnOutcome

__all__ = [
    "PASSIVATE_AFTER",
    "STREAM_WINDOW",
    "ActorHost",
    "Session",
    "TurnRunner",
    "notify",
    "read_batches",
    "wait_started",
]

PASSIVATE_AFTER = 5.0
"""Seconds an actor task waits for a new turn before it passivates."""

STREAM_WINDOW = 32
"""Chunks the agent may run ahead of a live stream reader (backpressure)."""

BATCH_MAX = 64
"""Most chunks a stream reader takes (and writes) at once."""

CHECKPOINT_EVERY = 8
"""A streaming agent that never awaits yields to the event loop every this many chunks."""


class Session:
    """What the orchestrator keeps for one session (a record, not a task)."""

    __slots__ = (
        "active",
        "changes",
        "core",
        "env_vars",
        "metadata",
        "moved",
        "sandbox",
        "saved",
        "settled",
        "state",
        "template_id",
        "tenant",
        "wake",
    )

    def __init__(
        self,
        core: SessionCore,
        *,
        tenant: str,
        template_id: str,
        metadata: dict[str, Any] | None = None,
        env_vars: dict[str, str] | None = None,
    ) -> None:
        self.core = core
        self.tenant = tenant
        self.template_id = template_id
        self.metadata = metadata
        self.env_vars = env_vars
        self.sandbox: Sandbox | None = None
        self.state: dict[str, Any] | None = None  # context.state, created on first turn
        self.active = False  # an actor task is running for this session
        self.wake: anyio.Event | None = None
        self.changes = 0  # changes worth a checkpoint so far
        self.saved = 0  # ... of which the store has this many
        self.moved = False  # let go of here: another node serves it now
        # context.state as the last finished turn left it (msgpack), for a
        # checkpoint taken while a turn runs and mutates the live dict
        self.settled: bytes | None = None

    @property
    def session_id(self) -> str:
        return self.core.session_id

    def kick(self) -> bool:
        """Wake the actor; False when none is running (the caller activates one)."""
        if not self.active:
            return False
        if self.wake is not None:
            self.wake.set()
        return True


def notify(turn: Turn) -> None:
    """Wake everyone waiting on ``turn`` (new event, start of stream, end)."""
    event = turn.listeners
    if event is not None:
        turn.listeners = None
        event.set()


async def _changed(turn: Turn) -> None:
    if turn.listeners is None:
        turn.listeners = anyio.Event()
    await turn.listeners.wait()


async def wait_started(turn: Turn) -> None:
    """Wait until the turn is done or has started streaming.

    Traced, a turn not started yet learns the waiting request's context here
    (its actor runs it in another task: see :mod:`._tracing`).
    """
    if not _tracing.ENABLED or turn.started_at is not None or turn.done:
        while not (turn.done or turn.streaming):
            await _changed(turn)
        return
    parent = _tracing.wait_for(turn)
    try:
        while not (turn.done or turn.streaming):
            await _changed(turn)
    finally:
        _tracing.done_waiting(turn, parent)


async def read_batches(
    turn: Turn, start: int = 0, *, live: bool = True
) -> AsyncIterator[tuple[int, Sequence[Any]]]:
    """Yield ``(seq, chunks)`` from event ``start`` (0-based) until the turn ends.

    ``chunks`` are all the events ready so far (at most :data:`BATCH_MAX`),
    ``seq`` the 1-based number of the first; a reader writes them at once.
    A ``live`` reader paces the agent: the actor runs at most
    :data:`STREAM_WINDOW` chunks ahead of it.
    """
    index = start
    while True:
        events = turn.events
        if index < len(events):
            batch = events[index : index + BATCH_MAX]
            first = index + 1
            index += len(batch)
            if live and index > turn.acked:
                turn.acked = index
                notify(turn)
            yield first, batch
            continue
        if turn.done:
            return
        await _changed(turn)


class ActorHost(Protocol):
    """What an actor needs from the node hosting it (:class:`.session_host.SessionHost`)."""

    clock: Callable[[], float]
    metrics: Any  # OrchestratorMetrics or None

    def activate(self, session: Session) -> None: ...

    def passivated(self, session: Session) -> None: ...

    def turn_timeout(self, session: Session) -> float: ...

    def turn_started(self) -> None: ...

    def turn_finished(self, session: Session, turn: Turn, outcome: TurnOutcome) -> None: ...

    def crash_verdict(self, session: Session) -> tuple[bool, str | None]: ...

    def spawn(self, func: Callable[..., Any], *args: Any) -> None: ...

    async def replace_sandbox(self, session: Session, restart: bool) -> None: ...


class TurnRunner:
    """Runs the turns of active sessions; one call of :meth:`run` is one actor task."""

    def __init__(self, host: ActorHost) -> None:
        self.host = host

    async def run(self, session: Session) -> None:
        """The actor: take turns from the mailbox until quiet, then passivate."""
        core = session.core
        clock = self.host.clock
        try:
            while True:
                turn = core.next_turn(clock())
                if turn is not None:
                    await self._run_turn(session, turn)
                    continue
                if core.ended:
                    return
                session.wake = anyio.Event()
                with anyio.move_on_after(PASSIVATE_AFTER) as quiet:
                    await session.wake.wait()
                session.wake = None
                if quiet.cancelled_caught:
                    self.host.passivated(session)
                    return  # passivate: the record lives on; a new turn reactivates
        finally:
            session.active = False
            session.wake = None
            # A message that arrived while we were returning must not be stranded.
            if not core.ended and core.queued and not core.paused:
                self.host.activate(session)

    async def run_inline(self, session: Session, turn: Turn) -> None:
        """Run a turn of an idle session in the caller's task: no hand-off to an actor.

        The turn starts in the request's task; a plain reply finishes there. A
        stream is handed to a task of its own (in the host's task group), which
        outlives the request, as an actor's would. A caller that disconnects
        does not cancel its request's task (the server only tells it), so the
        turn runs to its end and its reply is kept for a retry; a request
        cancelled because the server is stopping ends its turn as cancelled.
        Turns that queued up meanwhile go to an actor afterwards.
        """
        try:
            await self._run_turn(session, turn, inline=True)
        finally:
            if not turn.done and turn.cancel is not None:  # cancelled from outside
                with anyio.CancelScope(shield=True):
                    await self._finish(
                        session,
                        turn,
                        None,
                        0.0,
                        TurnOutcome.CANCELLED,
                        None,
                        ServiceUnavailableError("the orchestrator stopped during the turn"),
                    )
            core = session.core
            if not core.ended and core.queued and not core.paused:
                self.host.activate(session)

    async def _run_turn(self, session: Session, turn: Turn, *, inline: bool = False) -> None:
        host = self.host
        timeout = host.turn_timeout(session)
        deadline = anyio.current_time() + timeout
        host.turn_started()
        result: Any = None
        error: PPIOAgentRuntimeError | None = None
        outcome = TurnOutcome.OK
        span = None
        if _tracing.ENABLED and _tracing.turn_wanted(turn, inline=inline):
            span = TurnSpan.open(
                turn, session_id=session.session_id, template_id=session.template_id, inline=inline
            )
        try:
            # One scope for both ways a turn is stopped: its deadline, and
            # turn.cancel (called once the core has recorded why: core.stop).
            with anyio.CancelScope(deadline=deadline) as scope:
                turn.cancel = scope.cancel
                try:
                    result = await self._start(session, turn, span)
                    if hasattr(result, "__anext__"):
                        if inline:  # the stream outlives the request: a task of its own
                            turn.cancel = None
                            host.spawn(
                                self._run_stream, session, turn, result, deadline, timeout, span
                            )
                            return
                        await self._stream(session, turn, result)
                        result = None
                except SandboxCrashedError as exc:
                    error, outcome = exc, TurnOutcome.CRASHED
                except PPIOAgentRuntimeError as exc:
                    error, outcome = exc, TurnOutcome.ERROR
                except BaseException as exc:  # sys.exit() in an in-process agent: its turn only
                    if is_cancellation(exc):
                        raise
                    error, outcome = InvocationError(describe_failure(exc)), TurnOutcome.ERROR
            await self._finish(session, turn, scope, timeout, outcome, result, error, span)
        except BaseException as exc:
            if span is not None:
                span.end("cancelled" if is_cancellation(exc) else "error", exc)
            raise

    async def _run_stream(
        self,
        session: Session,
        turn: Turn,
        stream: Any,
        deadline: float,
        timeout: float,
        span: TurnSpan | None,
    ) -> None:
        """The rest of an inline turn whose reply is a stream."""
        error: PPIOAgentRuntimeError | None = None
        outcome = TurnOutcome.OK
        try:
            with anyio.CancelScope(deadline=deadline) as scope:
                turn.cancel = scope.cancel
                try:
                    await self._stream(session, turn, stream)
                except SandboxCrashedError as exc:
                    error, outcome = exc, TurnOutcome.CRASHED
                except PPIOAgentRuntimeError as exc:
                    error, outcome = exc, TurnOutcome.ERROR
                except BaseException as exc:
                    if is_cancellation(exc):
                        raise
                    error, outcome = InvocationError(describe_failure(exc)), TurnOutcome.ERROR
            await self._finish(session, turn, scope, timeout, outcome, None, error, span)
        except BaseException as exc:
            if span is not None:
                span.end("cancelled" if is_cancellation(exc) else "error", exc)
            raise
        core = session.core
        if not core.ended and core.queued and not core.paused:
            self.host.activate(session)

    async def _finish(
        self,
        session: Session,
        turn: Turn,
        scope: anyio.CancelScope | None,
        timeout: float,
        outcome: TurnOutcome,
        result: Any,
        error: PPIOAgentRuntimeError | None,
        span: TurnSpan | None = None,
    ) -> None:
        host = self.host
        turn.cancel = None
        if scope is not None and scope.cancelled_caught:
            if turn.stop_error is None:
                error = InvocationTimeoutError(
                    f"turn exceeded the template's timeout ({timeout:g} s)"
                )
                outcome = TurnOutcome.TIMEOUT
            else:
                error, outcome = turn.stop_error, TurnOutcome.CANCELLED
        restart = False
        if outcome is TurnOutcome.CRASHED:
            assert error is not None
            restart, fatal = host.crash_verdict(session)
            if fatal is not None:
                # The caller whose crash spent the budget hears that the session failed.
                error = SandboxCrashedError(
                    f"session {session.session_id} {fatal}; this turn's crash: {error.message}",
                    details=error.details,
                )
        if error is not None:
            error.request_id = turn.request_id
            result = None
        session.core.finish(turn, outcome, host.clock(), result=result, error=error)
        host.turn_finished(session, turn, outcome)
        if host.metrics is not None:
            seconds = (turn.finished_at or 0.0) - (turn.started_at or 0.0)
            host.metrics.record_template_turn(session.template_id, seconds)
        if span is not None:
            span.end(outcome.value, error)
        notify(turn)
        if outcome is TurnOutcome.CRASHED:
            with anyio.CancelScope(shield=True):
                await host.replace_sandbox(session, restart)

    async def _start(self, session: Session, turn: Turn, span: TurnSpan | None = None) -> Any:
        """Hand the turn to the sandbox: its result, or an async iterator of chunks."""
        sandbox = session.sandbox
        if sandbox is None or not sandbox.alive:
            raise SandboxCrashedError(f"session {session.session_id} has no running sandbox")
        if session.state is None:
            session.state = {}
        call = TurnCall(
            turn.payload,
            session_id=session.session_id,
            request_id=turn.request_id,
            state=session.state,
        )
        if span is None:
            return await sandbox.invoke(call)
        call.traceparent = span.traceparent
        token = span.activate()  # an in-process agent's own spans are the turn's children
        try:
            return await sandbox.invoke(call)
        finally:
            span.deactivate(token)

    async def _stream(self, session: Session, turn: Turn, result: Any) -> None:
        """Take a streamed reply's chunks as its readers take them."""
        core = session.core
        core.stream_started(turn)
        notify(turn)
        try:
            async for chunk in result:
                count = core.add_chunk(turn, chunk)
                notify(turn)
                # Backpressure: the agent waits for its reader. With no reader
                # (it left; the turn is cancelled unless one returns) it waits
                # too, so a fast generator cannot fill memory meanwhile.
                while count - turn.acked >= STREAM_WINDOW:
                    await _changed(turn)
                # A generator that never awaits still lets others run, after
                # its first chunk and then every few: its reader sends the
                # chunks that piled up meanwhile in one write.
                if count % CHECKPOINT_EVERY == 1:
                    await anyio.lowlevel.checkpoint()
        finally:
            aclose = getattr(result, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await aclose()
