"""Checkpointing sessions to a :class:`~.state_store.StateStore`.

What is written: a session's record (tenant, template, settings, clock),
its ``context.state`` when it runs in process, and its most recent finished
turns (their replies, so a retry after a failover replays instead of running
again). When, by ``--durability``:

``turn``
    After every turn, *before* its reply is sent: an acknowledged turn is
    never lost. Turns finishing together share one write (group commit), so
    the cost is one store write per burst, not per turn.
``interval`` (the default)
    Sessions changed by a turn are written together every ``interval``
    seconds (1 s): a node that dies loses at most the last interval's turns
    of its sessions (their retries run again), and sessions created in it.
``none``
    Nothing is written: sessions live and die with their node.

With ``turn`` and ``interval``, a session is also written when its actor
passivates, when it is paused, resumed or given a new timeout, and when the
node drains; closing a session deletes its record.

A state that msgpack cannot encode (an open file, a lock, a class instance)
is not a crash: the session keeps running, its last good checkpoint stays in
the store, a warning names the session and the value's type once, and
``ppio_checkpoint_failures_total{reason="unserializable"}`` counts it.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from ppio_sandbox.agent_runtime.errors import (
    ServiceUnavailableError,
    error_from_envelope,
)
from ppio_sandbox.agent_runtime.protocol import decode_msgpack, encode_msgpack

from .session_core import SessionCore, SessionLimits, Turn, TurnOutcome
from .state_store import (
    NIL,
    Checkpoint,
    SessionRecord,
    StateStore,
    TurnRecord,
    decode_turn,
    encode_record,
)

if TYPE_CHECKING:
    from .actor import Session

__all__ = [
    "Checkpointer",
    "Durability",
    "UnserializableState",
    "encode_checkpoint",
    "expiry_reason",
    "record_of",
    "session_from",
    "settle",
    "state_of",
    "turns_of",
]

logger = logging.getLogger("ppio_sandbox.orchestrator.checkpoints")

TURNS_KEPT = 16
"""Finished turns written with each checkpoint: a retry of an older turn after
a failover runs it again (retries come within seconds, not 16 turns later)."""

MAX_BATCH = 64
"""Checkpoints per store write (etcd takes at most 128 operations per txn)."""

_strict = msgspec.msgpack.Encoder()  # no enc_hook: what it cannot encode is refused
_turn_encoder = msgspec.msgpack.Encoder()


class Durability(enum.StrEnum):
    TURN = "turn"
    INTERVAL = "interval"
    NONE = "none"


class UnserializableState(ValueError):
    """``context.state`` holds a value msgpack cannot encode."""


def _turn_wire(turn: Turn, wall_offset: float) -> bytes:
    """A finished turn's :class:`TurnRecord`, encoded once and kept on the turn."""
    if turn.wire is None:
        error = None
        if turn.error is not None:
            error = {"status": turn.error.status_code, **turn.error.to_envelope()["error"]}
        events = msgspec.Raw(encode_msgpack(turn.events)) if turn.streaming else NIL
        record = TurnRecord(
            key=turn.key,
            body_hash=turn.body_hash,
            request_id=turn.request_id,
            outcome=(turn.outcome or TurnOutcome.OK).value,
            finished_at=(turn.finished_at or 0.0) + wall_offset,
            duration=(turn.finished_at or 0.0) - (turn.started_at or 0.0),
            result=msgspec.Raw(encode_msgpack(turn.result)) if error is None else NIL,
            error=error,
            streaming=turn.streaming,
            events=events,
        )
        turn.wire = _turn_encoder.encode(record)
    return turn.wire


UNSERIALIZABLE = b""
"""``Session.settled`` when the last finished turn left a state msgpack cannot encode."""


def settle(session: Session) -> str | None:
    """Encode ``context.state`` as a turn that just finished left it (``Session.settled``).

    A checkpoint always writes the state *settled* by the last finished turn,
    never the live dict a running turn may be changing, so a state and the
    turns recorded with it agree: a turn whose effects are in the state is in
    the record, and a retry after a failover replays it instead of running it
    on top of its own effects. Returns why it cannot be encoded, or None.
    """
    if session.state is None:
        return None
    try:
        session.settled = _strict.encode(session.state)
    except (TypeError, ValueError, OverflowError) as exc:
        session.settled = UNSERIALIZABLE
        return str(exc)
    return None


def record_of(session: Session, *, wall_offset: float, seq: int) -> SessionRecord:
    """The session as a checkpoint (times as wall clock). Raises UnserializableState."""
    core = session.core
    state = NIL
    settled = session.settled
    if settled == UNSERIALIZABLE:
        raise UnserializableState("the last turn left a context.state msgpack cannot encode")
    if settled is not None:
        state = msgspec.Raw(settled)
    elif session.state is not None and core.running is None:  # no turn finished yet here
        try:
            state = msgspec.Raw(_strict.encode(session.state))
        except (TypeError, ValueError, OverflowError) as exc:
            raise UnserializableState(str(exc)) from None
    turns = [
        msgspec.Raw(_turn_wire(turn, wall_offset))
        for turn in core.finished_turns(TURNS_KEPT)
        if turn.outcome is not TurnOutcome.CRASHED
    ]
    return SessionRecord(
        tenant=session.tenant,
        session_id=session.session_id,
        template_id=session.template_id,
        created_at=core.created_at + wall_offset,
        last_activity=core.last_activity + wall_offset,
        timeout_seconds=core.timeout_seconds,
        metadata=session.metadata or None,
        env_vars=session.env_vars or None,
        paused=core.paused,
        turns_ok=core.turns_ok,
        turns_failed=core.turns_failed,
        state=state,
        turns=turns,
        seq=seq,
    )


def turns_of(record: SessionRecord, *, wall_offset: float) -> list[Turn]:
    """The record's finished turns as the core keeps them (times on this node's clock)."""
    turns = []
    for raw in record.turns:
        item = decode_turn(raw)
        finished = item.finished_at - wall_offset
        turn = Turn(item.key, item.body_hash, {}, request_id=item.request_id, submitted_at=finished)
        turn.started_at = finished - item.duration
        turn.finished_at = finished
        turn.outcome = TurnOutcome(item.outcome)
        turn.streaming = item.streaming
        if item.streaming:
            turn.events = list(decode_msgpack(item.events))
        if item.error is not None:
            status = int(item.error.get("status", 500))
            turn.error = error_from_envelope(status, {"error": item.error})
        else:
            turn.result = decode_msgpack(item.result)
        turns.append(turn)
    return turns


def expiry_reason(record: SessionRecord, limits: SessionLimits, now: float) -> str | None:
    """Why a checkpointed session has ended by wall-clock ``now`` (idle or lifetime), or None."""
    if now >= record.created_at + limits.max_lifetime_seconds:
        return f"reached its maximum lifetime ({limits.max_lifetime_seconds:g} s)"
    if now >= record.last_activity + record.timeout_seconds:
        return f"expired after {record.timeout_seconds:g} s idle"
    return None


def session_from(record: SessionRecord, limits: SessionLimits, *, wall_offset: float) -> Session:
    """A session (record and core, no sandbox yet) rebuilt from its checkpoint."""
    from .actor import Session

    core = SessionCore.restored(
        record.session_id,
        created_at=record.created_at - wall_offset,
        last_activity=record.last_activity - wall_offset,
        timeout_seconds=record.timeout_seconds,
        limits=limits,
        turns_ok=record.turns_ok,
        turns_failed=record.turns_failed,
        turns=turns_of(record, wall_offset=wall_offset),
    )
    session = Session(
        core,
        tenant=record.tenant,
        template_id=record.template_id,
        metadata=record.metadata,
        env_vars=record.env_vars,
    )
    session.state = state_of(record)
    if record.state != NIL:
        session.settled = bytes(record.state)
    session.changes = session.saved = record.seq
    return session


def state_of(record: SessionRecord) -> dict[str, Any] | None:
    """The record's ``context.state``, decoded."""
    value = decode_msgpack(record.state)
    return value if isinstance(value, dict) else None


class _Round:
    """One write round: callers waiting for it, and how it went."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.error: BaseException | None = None


class Checkpointer:
    """Writes dirty sessions to the store, in batches, as the durability says.

    One task (:meth:`run`, in the host's task group) does every write. For
    ``turn`` durability a caller :meth:`flush`\\ es its session and waits for
    the write round that includes it; for ``interval`` a round runs every
    ``interval`` seconds. ``snapshot(session)`` builds a session's
    checkpoint on the event loop at the start of a round (None: skip it);
    ``lost(session)`` is told when a store refused a write because another
    node owns the session now.
    """

    def __init__(
        self,
        store: StateStore,
        durability: Durability,
        *,
        snapshot: Callable[[Session], Checkpoint | None],
        lost: Callable[[Session], None],
        interval: float = 1.0,
        metrics: Any = None,
    ) -> None:
        self.store = store
        self.durability = durability
        self.interval = interval
        self._snapshot = snapshot
        self._lost = lost
        self.metrics = metrics
        self._dirty: dict[tuple[str, str], Session] = {}
        self._wake = anyio.Event()
        self._next = _Round()
        self._writing: anyio.Event | None = None  # set when the round under way ends
        self.written = 0
        self.rounds = 0

    @property
    def enabled(self) -> bool:
        return self.durability is not Durability.NONE

    def mark(self, session: Session) -> None:
        """The session changed: write it in the next round."""
        if self.enabled:
            self._dirty[(session.tenant, session.session_id)] = session
            if self.durability is Durability.TURN:
                self._wake.set()

    async def flush(self, sessions: Iterable[Session] = ()) -> None:
        """Write these sessions (and every other dirty one) now; wait until written.

        Raises ServiceUnavailableError if the store could not take them.
        """
        if not self.enabled:
            return
        for session in sessions:
            self.mark(session)
        if not self._dirty:
            return
        round_ = self._next
        # Group commit, leader and followers: whoever finds no round under
        # way writes one (with everything dirty by then); the others wait
        # for it and, if their round is still to come, lead the next one.
        # No background task is needed, so a flush works during shutdown too.
        while not round_.done.is_set():
            if self._writing is None:
                await self.write_round()
            else:
                await self._writing.wait()
        if round_.error is not None:
            raise ServiceUnavailableError(
                f"could not checkpoint the session: {round_.error}", retry_after=1.0
            )

    async def run(self) -> None:
        """Background rounds: every ``interval`` (``interval``), or soon after a mark (``turn``)."""
        if not self.enabled:
            return
        while True:
            if self.durability is Durability.INTERVAL:
                with anyio.move_on_after(self.interval):
                    await self._wake.wait()
            else:
                await self._wake.wait()
            self._wake = anyio.Event()
            if self._dirty and self._writing is None:
                await self.write_round()

    async def write_round(self) -> None:
        """Write every dirty session now (shielded: a round is never half done)."""
        if self._writing is not None:
            raise RuntimeError("a checkpoint round is already under way")
        self._writing = writing = anyio.Event()
        round_, self._next = self._next, _Round()
        dirty, self._dirty = self._dirty, {}
        try:
            with anyio.CancelScope(shield=True):
                await self._write(list(dirty.values()))
        except Exception as exc:  # the store failed: keep them dirty, tell turn waiters
            logger.warning("checkpoint of %d sessions failed: %s", len(dirty), exc)
            self._count_failure("store", len(dirty))
            for key, session in dirty.items():
                self._dirty.setdefault(key, session)
            round_.error = exc
        finally:
            self._writing = None
            round_.done.set()
            writing.set()

    async def _write(self, sessions: list[Session]) -> None:
        batch: list[tuple[Session, Checkpoint]] = []
        for session in sessions:
            checkpoint = self._snapshot(session)
            if checkpoint is not None:
                batch.append((session, checkpoint))
        for start in range(0, len(batch), MAX_BATCH):
            part = batch[start : start + MAX_BATCH]
            results = await self.store.save([checkpoint for _, checkpoint in part])
            self.rounds += 1
            for (session, checkpoint), ok in zip(part, results, strict=True):
                if ok:
                    session.saved = max(session.saved, checkpoint.record.seq)
                    self.written += 1
                    if self.metrics is not None:
                        self.metrics.checkpoints_total.inc()
                        self.metrics.checkpoint_bytes_total.inc(len(checkpoint.data))
                else:
                    self._count_failure("fenced", 1)
                    self._lost(session)

    def _count_failure(self, reason: str, count: int) -> None:
        if self.metrics is not None:
            self.metrics.checkpoint_failures_total.labels(reason).inc(count)

    async def forget(self, session: Session, fence: Any = None) -> None:
        """Delete a closed session's record (and drop it from the next round)."""
        key = (session.tenant, session.session_id)
        self._dirty.pop(key, None)
        if self.enabled:
            try:
                await self.store.delete(session.tenant, session.session_id, fence)
            except Exception as exc:  # a leftover record expires by itself
                logger.warning("deleting the checkpoint of %s failed: %s", key, exc)


def encode_checkpoint(record: SessionRecord, fence: Any) -> Checkpoint:
    """A record ready for :meth:`StateStore.save`."""
    return Checkpoint(record=record, data=encode_record(record), fence=fence)
