"""The sessions one node hosts: admission, lifetimes, crashes, checkpoints.

HTTP-free and placement-free: the front end decides that a session belongs
here (:mod:`.placement`), then calls these methods. One task group (the
orchestrator's) owns every actor task, the expiry reaper, the checkpoint
writer and background closes.

A session the node owns but does not hold in memory -- it was checkpointed
before a restart, or before its previous node died -- is *dormant*: the
first call that names it brings it back from the store (:meth:`find`), with
its ``context.state`` and recent turns, on a fresh sandbox.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import anyio
import anyio.abc

from ppio_sandbox.agent_runtime.errors import (
    InvocationCancelledError,
    PPIOAgentRuntimeError,
    SandboxCrashedError,
    ServiceUnavailableError,
    SessionNotFoundError,
    TemplateNotFoundError,
    ValidationError,
)

from ._reaper import Reaper
from ._validate import check_session_id, check_timeout_seconds
from .actor import Session, TurnRunner, notify
from .checkpoints import (
    Checkpointer,
    Durability,
    UnserializableState,
    encode_checkpoint,
    expiry_reason,
    record_of,
    session_from,
    settle,
)
from .directory import InMemorySessionDirectory, SessionDirectory
from .sandbox.base import SandboxProvider
from .session_core import Admission, SessionCore, SessionLimits, Strategy, Turn, TurnOutcome
from .state_store import Checkpoint, MemoryStateStore, SessionRecord, StateStore

__all__ = ["Ownership", "Provisioner", "SessionHost"]

logger = logging.getLogger("ppio_sandbox.orchestrator")


class Provisioner(Protocol):
    """What the session host needs of templates (the orchestrator's template service)."""

    async def resolve_template(self, agent_id: str, tenant: str) -> Any: ...

    async def template_by_id(self, template_id: str, tenant: str) -> Any: ...

    async def provider_for(self, template: Any) -> SandboxProvider: ...

    def turn_timeout(self, template_id: str, tenant: str) -> float: ...


class Ownership(Protocol):
    """What the session host needs of placement (:mod:`.placement`)."""

    def new_session_id(self) -> str: ...

    def fence(self, tenant: str, session_id: str) -> Any: ...

    def check_caller_id(self, session_id: str) -> None: ...

    async def release(self, tenant: str, session_id: str, *, ended: bool = True) -> None: ...

    def checkpoint_absent(self, tenant: str, session_id: str, *, take: bool = False) -> bool: ...


def _local_ownership() -> Ownership:
    from .placement import SingleNode

    return SingleNode()


class _Exists(ValidationError):
    """A session of that name exists, or is being created or restored right now.

    A 400 for ``POST /v1/sessions``; for a first use by name (the AgentCore
    route) a sign that a concurrent first use got there first: use that one.
    """


class SessionHost:
    """The node-local sessions. See the module docstring."""

    def __init__(
        self,
        provisioner: Provisioner,
        *,
        limits: SessionLimits,
        start_timeout: float = 30.0,
        stream_resume_grace: float = 10.0,
        directory: SessionDirectory | None = None,
        store: StateStore | None = None,
        durability: Durability = Durability.INTERVAL,
        checkpoint_interval: float = 1.0,
        ownership: Ownership | None = None,
        metrics: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.provisioner = provisioner
        self.limits = limits
        self.start_timeout = start_timeout
        self.stream_resume_grace = stream_resume_grace
        self.directory = directory or InMemorySessionDirectory()
        self.ownership: Ownership = ownership or _local_ownership()
        self.metrics = metrics
        self.clock = clock
        self.wall_offset = time.time() - clock()
        self.store = store or MemoryStateStore()
        self.checkpoints = Checkpointer(
            self.store,
            durability,
            snapshot=self._snapshot,
            lost=self._lost,
            interval=checkpoint_interval,
            metrics=metrics,
        )
        self.accepting = True
        self.running_turns = 0
        self._idle: anyio.Event | None = None  # set up only while draining
        self._creating: dict[tuple[str, str], anyio.Event] = {}
        self._unserializable: set[tuple[str, str]] = set()
        self._runner = TurnRunner(self)
        self._reaper = Reaper(self)
        self._tg: anyio.abc.TaskGroup | None = None

    # -- lifecycle ----------------------------------------------------------

    def start(self, tg: anyio.abc.TaskGroup) -> None:
        """Run the reaper and the checkpoint writer in ``tg`` (the owner's task group)."""
        self._tg = tg
        tg.start_soon(self._reaper.run)
        tg.start_soon(self.checkpoints.run)

    def spawn(self, func: Callable[..., Any], *args: Any) -> None:
        if self._tg is None:
            raise RuntimeError("the session host is not running")
        self._tg.start_soon(func, *args)

    def count_states(self) -> dict[str, float]:
        counts: dict[str, float] = {}
        for session in self.directory:
            state = session.core.state.value
            counts[state] = counts.get(state, 0) + 1
        return counts

    def mailbox_depth(self) -> float:
        return float(sum(session.core.queued for session in self.directory))

    async def drain(self, grace: float) -> None:
        """Stop admitting, let running turns finish for ``grace`` s, then let go of every session.

        With checkpoints on, sessions are written and *evicted*: they come
        back from the store after a restart, or on another node. Without
        them, sessions are closed. Turns still waiting or running when the
        grace is over answer 503 ``ServiceUnavailableError`` (retryable).
        """
        self.accepting = False
        if self.running_turns and grace > 0:
            logger.info("draining %d running turns (up to %.0f s)", self.running_turns, grace)
            self._idle = idle = anyio.Event()
            with anyio.move_on_after(grace):
                await idle.wait()
        sessions = list(self.directory)
        if self.checkpoints.enabled:
            with anyio.CancelScope(shield=True):
                try:
                    await self.checkpoints.flush(sessions)
                except ServiceUnavailableError as exc:
                    logger.error("final checkpoint failed, sessions may lose state: %s", exc)
            async with anyio.create_task_group() as tg:
                for session in sessions:
                    tg.start_soon(self.evict, session, "is moving: its node shut down")
            if sessions:
                logger.info(
                    "%d sessions checkpointed, to come back on their next call", len(sessions)
                )
            return
        async with anyio.create_task_group() as tg:
            for session in sessions:
                tg.start_soon(
                    self.close_session,
                    session,
                    "closed: the orchestrator shut down",
                    ServiceUnavailableError,
                )

    # -- finding and creating -----------------------------------------------

    async def create_session(
        self,
        tenant: str,
        template_id: str,
        *,
        session_id: str | None = None,
        timeout_seconds: float | None = None,
        env_vars: dict[str, str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Session:
        """Start a session of a deployed template; returns once its sandbox is ready.

        All or nothing: a session that cannot be fully set up is not in the
        directory and its sandbox is closed.
        """
        self.check_accepting()
        if timeout_seconds is not None:
            timeout_seconds = check_timeout_seconds(timeout_seconds)
        if session_id:
            self.ownership.check_caller_id(check_session_id(session_id))
        sid = session_id or self.ownership.new_session_id()
        template = await self.provisioner.resolve_template(template_id, tenant)
        if template.phase != "deployed":
            raise TemplateNotFoundError(f"template {template.id} is {template.phase}, not deployed")
        key = (tenant, sid)
        if key in self._creating or self.directory.get(tenant, sid) is not None:
            raise _Exists(f"session {sid} already exists")
        if (
            session_id
            and self.checkpoints.enabled
            and not self.ownership.checkpoint_absent(tenant, sid, take=True)
        ):
            ready = self._creating[key] = anyio.Event()
            try:
                stored = await self.store.load(tenant, sid)
            finally:
                del self._creating[key]
                ready.set()
            if stored is not None:
                raise _Exists(f"session {sid} already exists")
        now = self.clock()
        core = SessionCore(sid, now=now, limits=self.limits, timeout_seconds=timeout_seconds)
        session = Session(
            core, tenant=tenant, template_id=template.id, metadata=metadata, env_vars=env_vars
        )
        await self._start(session, template)
        self.changed(session)
        if self.checkpoints.durability is Durability.TURN:
            # Acknowledged means stored: a session created and then lost with
            # its node would be a 404 to a caller that was told 201.
            try:
                await self.checkpoints.flush([session])
            except ServiceUnavailableError:
                await self.close_session(session, "closed: it could not be stored")
                raise
        return session

    async def _start(self, session: Session, template: Any, *, paused: bool = False) -> None:
        """Give the session a sandbox and add it to the directory, or leave no trace."""
        tenant, sid = session.tenant, session.session_id
        key = (tenant, sid)
        ready = self._creating[key] = anyio.Event()
        try:
            provider = await self.provisioner.provider_for(template)
            try:
                with anyio.fail_after(self.start_timeout):
                    session.sandbox = await provider.create(sid, session.env_vars)
            except ValueError as exc:  # e.g. env_vars the sandbox refuses
                raise ValidationError(str(exc)) from None
            except TimeoutError:
                raise ServiceUnavailableError(
                    f"sandbox for {template.id} did not start in {self.start_timeout:g} s"
                ) from None
            try:
                self._count_sandbox_start(provider.kind)
                session.core.started(self.clock())
                if paused:
                    session.core.pause(self.clock())
                    await session.sandbox.pause()
                self.directory.add(session)
                self._reaper.track(session)
            except BaseException:
                self.directory.remove(tenant, sid, None)
                with anyio.CancelScope(shield=True):
                    await session.sandbox.close()
                raise
        finally:
            del self._creating[key]
            ready.set()

    async def find(self, tenant: str, session_id: str) -> Session | None:
        """The tenant's live session, brought back from its checkpoint if dormant; else None.

        Raises SessionNotFoundError naming why, for a session that ended.
        """
        key = (tenant, session_id)
        while (pending := self._creating.get(key)) is not None:
            await pending.wait()
        session = self.directory.get(tenant, session_id)
        if session is not None:
            session.core.check_alive()
            return session
        reason = self.directory.end_reason(tenant, session_id)
        if reason is not None:
            raise SessionNotFoundError(f"session {session_id} {reason}")
        if not self.checkpoints.enabled:
            return None
        return await self._restore(tenant, session_id)

    async def _restore(self, tenant: str, session_id: str) -> Session | None:
        if self.ownership.checkpoint_absent(tenant, session_id):
            return None  # this node's claim just found no checkpoint: a new session
        key = (tenant, session_id)
        ready = self._creating[key] = anyio.Event()
        try:
            record = await self.store.load(tenant, session_id)
        finally:
            del self._creating[key]
            ready.set()
        if record is None:
            return None
        while (pending := self._creating.get(key)) is not None:  # restored meanwhile?
            await pending.wait()
        session = self.directory.get(tenant, session_id)
        if session is not None:
            return session
        self.check_accepting()
        reason = self._expired(record)
        if reason is not None:
            await self.store.delete(tenant, session_id, self.ownership.fence(tenant, session_id))
            self.directory.add_tombstone(tenant, session_id, reason)
            raise SessionNotFoundError(f"session {session_id} {reason}")
        try:
            template = await self.provisioner.template_by_id(record.template_id, tenant)
        except TemplateNotFoundError:
            reason = f"closed: its template {record.template_id} is gone"
            await self.store.delete(tenant, session_id, self.ownership.fence(tenant, session_id))
            self.directory.add_tombstone(tenant, session_id, reason)
            raise SessionNotFoundError(f"session {session_id} {reason}") from None
        session = self.session_from(record)
        await self._start(session, template, paused=record.paused)
        if self.metrics is not None:
            self.metrics.sessions_restored_total.inc()
        logger.info(
            "session %s restored from its checkpoint (%d turns, state %s)",
            session_id,
            record.turns_ok + record.turns_failed,
            "kept" if session.state is not None else "empty",
        )
        return session

    def _expired(self, record: SessionRecord) -> str | None:
        return expiry_reason(record, self.limits, time.time())

    def session_from(self, record: SessionRecord) -> Session:
        """A session record (not started) rebuilt from its checkpoint."""
        return session_from(record, self.limits, wall_offset=self.wall_offset)

    async def open_session(self, tenant: str, session_id: str) -> Session:
        """A live session of the tenant, restored if dormant; 404 naming why it ended."""
        session = await self.find(tenant, session_id)
        if session is None:
            raise SessionNotFoundError(f"session {session_id} not found")
        return session

    def get_session(self, tenant: str, session_id: str) -> Session:
        """A live session of the tenant held in memory here; 404 otherwise."""
        session = self.directory.get(tenant, session_id)
        if session is None:
            reason = self.directory.end_reason(tenant, session_id)
            raise SessionNotFoundError(
                f"session {session_id} {reason}" if reason else f"session {session_id} not found"
            )
        session.core.check_alive()
        return session

    async def get_or_create_session(
        self, tenant: str, agent_id: str, session_id: str | None
    ) -> Session:
        """The AgentCore route: the session named by the caller, created on first use.

        Concurrent first uses of one name agree: all but the one that creates
        it wait for it (a name being created or restored is not "taken").
        """
        if not session_id:
            return await self.create_session(tenant, agent_id)
        check_session_id(session_id)
        for attempt in range(8):
            session = await self.find(tenant, session_id)  # waits out a creation under way
            if session is not None:
                return session
            try:
                return await self.create_session(tenant, agent_id, session_id=session_id)
            except _Exists:
                if attempt == 7:
                    raise
                continue  # a concurrent first use created it: find it
        raise AssertionError("unreachable")

    def list_sessions(self, tenant: str) -> list[Session]:
        return [s for s in self.directory if s.tenant == tenant]

    async def list_dormant(self, tenant: str) -> list[SessionRecord]:
        """The tenant's checkpointed sessions that are not in memory here."""
        if not self.checkpoints.enabled:
            return []
        return [
            record
            for record in await self.store.list(tenant)
            if self.directory.get(tenant, record.session_id) is None
            and self.directory.end_reason(tenant, record.session_id) is None
            and self._expired(record) is None
        ]

    # -- ending -------------------------------------------------------------

    async def close_session(
        self,
        session: Session,
        reason: str = "closed by the caller",
        error: type[PPIOAgentRuntimeError] = SessionNotFoundError,
    ) -> None:
        """End a session: fail what waits, cancel what runs (with ``error``), stop the sandbox."""
        if session.core.ended:
            return
        await self._end(session, reason, error, tombstone=True)
        await self.checkpoints.forget(
            session, self.ownership.fence(session.tenant, session.session_id)
        )
        await self.ownership.release(session.tenant, session.session_id)
        logger.info("session %s %s", session.session_id, reason)

    async def evict(self, session: Session, reason: str) -> None:
        """Let go of a session without ending it: its checkpoint lives on elsewhere.

        Waiting and running turns fail with a retryable 503.
        """
        if session.core.ended:
            return
        session.moved = True
        await self._end(session, reason, ServiceUnavailableError, tombstone=False)
        await self.ownership.release(session.tenant, session.session_id, ended=False)

    async def _end(
        self,
        session: Session,
        reason: str,
        error: type[PPIOAgentRuntimeError],
        *,
        tombstone: bool,
    ) -> None:
        core = session.core
        running = core.running
        for turn in core.begin_close(reason, self.clock(), error):
            notify(turn)
        if running is not None and running.stop_error is not None and running.cancel is not None:
            running.cancel()
        session.kick()
        self.directory.remove(session.tenant, session.session_id, reason if tombstone else None)
        with anyio.CancelScope(shield=True):
            if session.sandbox is not None:
                await session.sandbox.close()
        core.closed()

    async def evict_all(self, reason: str = "is moving: its node lost the cluster") -> None:
        """Let go of every session at once (the node may no longer own them)."""
        sessions = list(self.directory)
        async with anyio.create_task_group() as tg:
            for session in sessions:
                tg.start_soon(self.evict, session, reason)
        if sessions:
            logger.warning("%d sessions let go of: this node %s", len(sessions), reason[3:])

    def _lost(self, session: Session) -> None:
        """A store refused our checkpoint: another node owns the session now."""
        session.moved = True  # before anything else: no turn of it may be acknowledged now
        logger.warning(
            "session %s: another node owns it now; letting go of it here", session.session_id
        )
        self.spawn(self.evict, session, "moved to another node")

    # -- lifetime operations ------------------------------------------------

    async def pause(self, session: Session) -> None:
        session.core.pause(self.clock())
        if session.sandbox is not None:
            await session.sandbox.pause()
        self.changed(session)

    async def resume(self, session: Session) -> None:
        if session.sandbox is not None:
            await session.sandbox.resume()
        session.core.resume(self.clock())
        if session.core.queued:
            self.activate(session)
        self.changed(session)

    def set_timeout(self, session: Session, seconds: object) -> None:
        session.core.set_timeout(check_timeout_seconds(seconds), self.clock())
        self._reaper.track(session)
        self.changed(session)

    # -- checkpoints --------------------------------------------------------

    def changed(self, session: Session) -> None:
        """The session has something new to checkpoint."""
        session.changes += 1
        self.checkpoints.mark(session)

    def _snapshot(self, session: Session) -> Checkpoint | None:
        if session.core.ended and session.core.end_reason is not None:
            return None  # closed meanwhile: its record is being deleted
        key = (session.tenant, session.session_id)
        try:
            record = record_of(session, wall_offset=self.wall_offset, seq=session.changes)
        except UnserializableState as exc:
            self._cannot_checkpoint(session, str(exc))
            return None
        self._unserializable.discard(key)
        return encode_checkpoint(record, self.ownership.fence(session.tenant, session.session_id))

    def _cannot_checkpoint(self, session: Session, problem: str) -> None:
        key = (session.tenant, session.session_id)
        if key not in self._unserializable:
            self._unserializable.add(key)
            logger.warning(
                "session %s: context.state cannot be checkpointed (%s); its last good "
                "checkpoint is kept, and a failover would bring that back",
                session.session_id,
                problem,
            )
        if self.metrics is not None:
            self.metrics.checkpoint_failures_total.labels("unserializable").inc()

    async def durable(self, session: Session, turn: Turn) -> None:
        """With ``turn`` durability, wait until the turn's outcome is in the store."""
        if self.checkpoints.durability is not Durability.TURN or turn.outcome is None:
            return
        if turn.outcome is TurnOutcome.CRASHED:
            return  # not replayed: nothing to keep
        if session.saved < turn.change and not session.core.ended:
            # One round suffices: it snapshots the session after this call
            # (a state it cannot encode is skipped, with a warning).
            await self.checkpoints.flush([session])
        if session.saved >= turn.change or not session.moved:
            return  # stored; or closed by its caller (nothing to keep); or not storable (warned)
        # The session left this node (its lease was lost, another node owns it
        # now) before the turn was stored: not acknowledged; the retry runs it there.
        raise ServiceUnavailableError(
            f"session {session.session_id} moved to another node before this turn could be "
            "stored; retry with the same Idempotency-Key",
            retry_after=1.0,
        )

    def passivated(self, session: Session) -> None:
        """The actor went quiet: make sure what it did is written."""
        if session.saved < session.changes:
            self.checkpoints.mark(session)

    # -- turns --------------------------------------------------------------

    def submit(
        self,
        session: Session,
        payload: dict[str, Any],
        *,
        key: str,
        body_hash: bytes,
        request_id: str,
        strategy: Strategy = Strategy.ENQUEUE,
        inline: bool = False,
    ) -> tuple[Admission, Turn]:
        """Admit one invocation; the caller then waits on the returned turn.

        With ``inline``, a turn of an idle session (nothing running, nothing
        queued before it) is taken at once and :attr:`Admission.RUN` returned:
        the caller runs it with :meth:`run_inline`, in its own task.
        """
        self.check_accepting()
        now = self.clock()
        turn = Turn(key, body_hash, payload, request_id=request_id, submitted_at=now)
        core = session.core
        admission, turn, to_cancel = core.admit(turn, strategy, now)
        if to_cancel is not None and to_cancel.cancel is not None:
            error = InvocationCancelledError(f"interrupted by a newer turn (request {request_id})")
            if core.stop(to_cancel, error):
                to_cancel.cancel()
        if admission is Admission.QUEUED:
            idle = core.running is None and core.queued == 1 and not core.paused
            if inline and idle and core.next_turn(now) is turn:
                return Admission.RUN, turn
            self.activate(session)
        return admission, turn

    async def run_inline(self, session: Session, turn: Turn) -> None:
        """Run a turn :meth:`submit` gave back as :attr:`Admission.RUN`, in this task."""
        await self._runner.run_inline(session, turn)

    def activate(self, session: Session) -> None:
        """Make sure an actor task runs the session's mailbox."""
        if session.core.paused or session.kick():
            return
        session.active = True
        self.spawn(self._runner.run, session)

    def reader_left(self, session: Session, turn: Turn) -> None:
        """A stream's reader went away; cancel the turn unless one comes back."""
        turn.readers -= 1
        if turn.readers == 0 and not turn.done and turn.streaming:
            self.spawn(self._cancel_orphan, session, turn)

    async def _cancel_orphan(self, session: Session, turn: Turn) -> None:
        await anyio.sleep(self.stream_resume_grace)
        if turn.readers == 0 and not turn.done and turn.cancel is not None:
            error = InvocationCancelledError("the caller disconnected from the stream")
            if session.core.stop(turn, error):
                turn.cancel()

    def turn_timeout(self, session: Session) -> float:
        """The template's ``spec.runtime.timeout`` for each turn."""
        return self.provisioner.turn_timeout(session.template_id, session.tenant)

    def turn_started(self) -> None:
        self.running_turns += 1

    def turn_finished(self, session: Session, turn: Turn, outcome: TurnOutcome) -> None:
        self.running_turns -= 1
        if self.running_turns == 0 and self._idle is not None:
            self._idle.set()
        if outcome is not TurnOutcome.CRASHED:
            if self.checkpoints.enabled:
                problem = settle(session)
                if problem is not None:
                    self._cannot_checkpoint(session, problem)
            self.changed(session)
        turn.change = session.changes
        if self.metrics is not None:
            duration = (turn.finished_at or 0.0) - (turn.started_at or 0.0)
            self.metrics.record_turn(outcome.value, duration)

    def crash_verdict(self, session: Session) -> tuple[bool, str | None]:
        """A sandbox died in a turn: ``(restart, None)``, or ``(False, why the session failed)``.

        Decided before the crashed turn's caller is answered, so a call made
        right after a fatal crash already hears that the session failed, and
        so does the caller of the turn whose crash spent the restart budget.
        """
        core = session.core
        kind = session.sandbox.kind if session.sandbox is not None else "unknown"
        if self.metrics is not None:
            self.metrics.sandbox_crashes_total.labels(kind).inc()
        if core.ended:
            return False, None
        if core.sandbox_crashed(self.clock()):
            return True, None
        reason = (
            f"failed: its sandbox crashed more than {core.limits.restart_budget} times "
            f"in {core.limits.restart_window:g} s"
        )
        for waiting in core.fail(reason, self.clock(), SandboxCrashedError):
            notify(waiting)
        self.directory.remove(session.tenant, session.session_id, reason)
        self.spawn(
            self.checkpoints.forget,
            session,
            self.ownership.fence(session.tenant, session.session_id),
        )
        logger.warning("session %s %s", session.session_id, reason)
        return False, reason

    async def replace_sandbox(self, session: Session, restart: bool) -> None:
        """Stop a crashed sandbox and, if ``restart``, start a fresh one in its place."""
        if session.sandbox is not None:
            await session.sandbox.close()
        if not restart or session.core.ended:
            return
        logger.warning("session %s: sandbox crashed, restarting", session.session_id)
        try:
            template = await self.provisioner.template_by_id(session.template_id, session.tenant)
            provider = await self.provisioner.provider_for(template)
            with anyio.fail_after(self.start_timeout):
                session.sandbox = await provider.create(session.session_id, session.env_vars)
            self._count_sandbox_start(provider.kind)
        except (PPIOAgentRuntimeError, TimeoutError, OSError) as exc:
            logger.warning("session %s: restart failed: %s", session.session_id, exc)
            session.sandbox = None  # the next turn fails fast and counts another crash

    def _count_sandbox_start(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.sandbox_starts_total.labels(kind).inc()

    def check_accepting(self) -> None:
        if not self.accepting:
            raise ServiceUnavailableError("the orchestrator is shutting down", retry_after=1.0)
