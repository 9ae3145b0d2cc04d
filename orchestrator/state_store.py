"""Where sessions are checkpointed so that they outlive their node.

A :class:`SessionRecord` is everything needed to bring a session back on
another node or after a restart: who owns it (tenant), what it runs
(template), its settings and clock (wall-clock times, since monotonic clocks
differ between processes), its ``context.state`` (msgpack; in-process
sandboxes only: a process sandbox's state lives in its process and is lost
with it) and its idempotency records (finished turns, so a retry after a
failover replays the reply instead of running the turn again).

Two stores implement :class:`StateStore`: :class:`SQLiteStateStore`, the
embedded default (``sessions.sqlite3`` in the data dir, shared by the
workers of one machine), and the etcd store of a cluster
(:mod:`.cluster.etcd_store`). :class:`MemoryStateStore` is the store of
tests and of ``--durability none``.

Fencing. Every write carries the writer's *fence*, an opaque token from the
node's ownership of the session (see :mod:`.placement`). A store refuses a
write whose fence is stale -- another node owns the session now -- and
reports it, so a node that lost a session never overwrites its new owner's
checkpoints. The SQLite store has no second node to fear (one machine,
workers own disjoint sessions by construction) and takes every write.
"""

from __future__ import annotations

import abc
import functools
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import msgspec

__all__ = [
    "Checkpoint",
    "MemoryStateStore",
    "SQLiteStateStore",
    "SessionRecord",
    "StateStore",
    "TurnRecord",
    "decode_record",
    "decode_turn",
    "encode_record",
]


NIL = msgspec.Raw(b"\xc0")
"""msgpack's nil, as an already encoded value."""


class TurnRecord(msgspec.Struct, array_like=True, omit_defaults=True):
    """A finished turn, kept so that a retry with its key replays the reply."""

    key: str
    body_hash: bytes
    request_id: str
    outcome: str
    finished_at: float  # wall clock
    duration: float = 0.0
    result: msgspec.Raw = NIL
    error: dict[str, Any] | None = None
    streaming: bool = False
    events: msgspec.Raw = NIL  # msgpack array of the chunks, for a stream


class SessionRecord(msgspec.Struct, omit_defaults=True):
    """A session's checkpoint: everything but its sandbox."""

    tenant: str
    session_id: str
    template_id: str
    created_at: float  # wall clock, like every time here
    last_activity: float
    timeout_seconds: float
    metadata: dict[str, Any] | None = None
    env_vars: dict[str, str] | None = None
    paused: bool = False
    turns_ok: int = 0
    turns_failed: int = 0
    state: msgspec.Raw = NIL  # msgpack of context.state; nil: never had one
    turns: list[msgspec.Raw] = []  # encoded TurnRecords, oldest first
    seq: int = 0  # checkpoints written so far (a store keeps the highest)

    def expires_at(self, max_lifetime: float) -> float:
        """When the session ends if nothing happens (idle timeout or lifetime)."""
        return min(self.created_at + max_lifetime, self.last_activity + self.timeout_seconds)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(SessionRecord)


def encode_record(record: SessionRecord) -> bytes:
    return _encoder.encode(record)


def decode_record(data: bytes) -> SessionRecord:
    return _decoder.decode(data)


_turn_decoder = msgspec.msgpack.Decoder(TurnRecord)


def decode_turn(data: bytes | msgspec.Raw) -> TurnRecord:
    return _turn_decoder.decode(data)


class Checkpoint(msgspec.Struct):
    """One write: the record, encoded, under the writer's fence."""

    record: SessionRecord
    data: bytes
    fence: Any = None


class StateStore(abc.ABC):
    """Session checkpoints keyed by ``(tenant, session_id)``."""

    max_record_bytes: int | None = None
    """The largest record the store takes (None: no limit of its own)."""

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    @abc.abstractmethod
    async def load(self, tenant: str, session_id: str) -> SessionRecord | None:
        """The session's last checkpoint, or None."""

    @abc.abstractmethod
    async def save(self, batch: Sequence[Checkpoint]) -> list[bool]:
        """Write a batch; per checkpoint, False when its fence was stale (not written)."""

    @abc.abstractmethod
    async def delete(self, tenant: str, session_id: str, fence: Any = None) -> None:
        """Forget a session (closed or expired)."""

    @abc.abstractmethod
    async def list(self, tenant: str | None = None) -> list[SessionRecord]:
        """Every stored session of ``tenant`` (None: all)."""


class MemoryStateStore(StateStore):
    """A dict: survives nothing but a session's passivation. For tests and ``none``."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], bytes] = {}
        self.writes = 0

    async def load(self, tenant: str, session_id: str) -> SessionRecord | None:
        data = self.records.get((tenant, session_id))
        return decode_record(data) if data is not None else None

    async def save(self, batch: Sequence[Checkpoint]) -> list[bool]:
        for item in batch:
            self.records[(item.record.tenant, item.record.session_id)] = item.data
        self.writes += 1
        return [True] * len(batch)

    async def delete(self, tenant: str, session_id: str, fence: Any = None) -> None:
        self.records.pop((tenant, session_id), None)

    async def list(self, tenant: str | None = None) -> list[SessionRecord]:
        return [
            decode_record(data)
            for (owner, _), data in self.records.items()
            if tenant is None or owner == tenant
        ]


_T = TypeVar("_T")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    tenant TEXT NOT NULL, session_id TEXT NOT NULL,
    seq INTEGER NOT NULL, record BLOB NOT NULL,
    PRIMARY KEY (tenant, session_id));
"""


class SQLiteStateStore(StateStore):
    """Checkpoints in ``<data_dir>/sessions.sqlite3`` (WAL; safe for several processes).

    ``synchronous`` is ``NORMAL`` by default: a committed checkpoint survives
    the process being killed, not always a power loss; ``durable=True``
    (``--durability turn``) makes it ``FULL``. Writes run in a worker thread;
    a batch is one transaction.
    """

    def __init__(self, path: Path, *, durable: bool = False) -> None:
        self.path = Path(path)
        self.durable = durable
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    async def _run(self, func: Callable[..., _T], *args: Any) -> _T:
        return await anyio.to_thread.run_sync(functools.partial(func, *args))

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the state store is not open")
        return self._db

    async def open(self) -> None:
        def connect() -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'FULL' if self.durable else 'NORMAL'}")
            db.executescript(_SCHEMA)
            self._db = db

        if self._db is None:
            await self._run(connect)

    async def close(self) -> None:
        def disconnect() -> None:
            with self._lock:
                if self._db is not None:
                    self._db.close()
                    self._db = None

        with anyio.CancelScope(shield=True):
            await self._run(disconnect)

    async def load(self, tenant: str, session_id: str) -> SessionRecord | None:
        def read() -> bytes | None:
            with self._lock:
                row = (
                    self._conn()
                    .execute(
                        "SELECT record FROM sessions WHERE tenant = ? AND session_id = ?",
                        (tenant, session_id),
                    )
                    .fetchone()
                )
            return bytes(row[0]) if row else None

        data = await self._run(read)
        return decode_record(data) if data is not None else None

    async def save(self, batch: Sequence[Checkpoint]) -> list[bool]:
        rows = [(c.record.tenant, c.record.session_id, c.record.seq, c.data) for c in batch]

        def write() -> None:
            with self._lock:
                db = self._conn()
                with db:  # one transaction; an older checkpoint never replaces a newer one
                    db.executemany(
                        "INSERT INTO sessions (tenant, session_id, seq, record) VALUES (?, ?, ?, ?)"
                        " ON CONFLICT (tenant, session_id) DO UPDATE SET"
                        " seq = excluded.seq, record = excluded.record"
                        " WHERE excluded.seq >= sessions.seq",
                        rows,
                    )

        if rows:
            await self._run(write)
        return [True] * len(batch)

    async def delete(self, tenant: str, session_id: str, fence: Any = None) -> None:
        def remove() -> None:
            with self._lock:
                db = self._conn()
                with db:
                    db.execute(
                        "DELETE FROM sessions WHERE tenant = ? AND session_id = ?",
                        (tenant, session_id),
                    )

        await self._run(remove)

    async def list(self, tenant: str | None = None) -> list[SessionRecord]:
        def read() -> list[bytes]:
            with self._lock:
                db = self._conn()
                if tenant is None:
                    rows = db.execute("SELECT record FROM sessions").fetchall()
                else:
                    rows = db.execute(
                        "SELECT record FROM sessions WHERE tenant = ?", (tenant,)
                    ).fetchall()
            return [bytes(row[0]) for row in rows]

        return [decode_record(data) for data in await self._run(read)]
