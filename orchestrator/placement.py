"""Placement: which node owns a session, and how to reach it.

Every session is owned by exactly one node -- one worker process -- and
every turn of it runs there, in order. Ownership is *recorded*, not hashed
(so a joining node moves nothing):

* a session the orchestrator names is owned by the node that created it,
  and its id says which: ``sess-<16 hex>`` on a single node,
  ``sess-<16 hex>.w<i>`` among the workers of one machine,
  ``sess-<16 hex>.<node>.<incarnation>`` in an etcd cluster (the
  incarnation tells a restarted node from its previous life). Creating one
  costs no coordination at all;
* a session the caller names (``X-PPIO-Session-Id``) has no owner in its
  id: the first worker or node to use it *claims* it -- among the workers
  of one machine in a shared SQLite table, in a cluster with one etcd
  transaction (:mod:`.cluster.membership`), as a node that takes over a
  session whose owner died does too.

Three placements implement the interface: :class:`SingleNode` (the
default: everything is local), :class:`WorkerSet` (``serve --workers N``:
a fixed set of workers, no engine) and the etcd one
(:class:`.cluster.membership.ClusterPlacement`).
"""

from __future__ import annotations

import abc
import re
import secrets
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

from ppio_sandbox.agent_runtime.errors import ValidationError

__all__ = [
    "Member",
    "Owner",
    "Placement",
    "SingleNode",
    "WorkerSet",
    "check_caller_session_id",
]

_GENERATED = re.compile(r"sess-[0-9a-f]{16}\.(.+)")


@dataclass(frozen=True)
class Owner:
    """Where a session lives: a node, whether it is this one, and its address."""

    node: str
    local: bool
    address: str | None = None  # "unix:/path" or "http://host:port"
    fence: Any = None


@dataclass
class Member:
    """One node as the cluster sees it."""

    node: str
    address: str | None
    incarnation: str = ""
    machine: str = ""
    load: dict[str, Any] = field(default_factory=dict)
    alive: bool = True


def home_of(session_id: str) -> str | None:
    """The node part of an id the orchestrator generated (``w1``, ``n1.2k``), else None."""
    match = _GENERATED.fullmatch(session_id)
    return match.group(1) if match else None


def check_caller_session_id(session_id: str) -> None:
    """Refuse a caller-chosen id in the form reserved for generated ones."""
    if _GENERATED.fullmatch(session_id):
        raise ValidationError(
            "session ids of the form sess-<16 hex>.<node> are reserved for the ids the "
            "orchestrator generates; choose another name"
        )


class Placement(abc.ABC):
    """Owners of sessions; ids for new ones; fences for checkpoints."""

    node_id: str = "local"
    multi_node: bool = False
    """False only for :class:`SingleNode`: then nothing is ever forwarded."""
    retry_after: float = 1.0
    """What a caller is told to wait when the owner of its session cannot be reached."""
    ownership_moves: bool = False
    """True where a session can change owners while a request for it is forwarded (a cluster)."""

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        """Join (cluster), start background tasks in ``tg``."""
        return None

    async def close(self) -> None:
        """Leave: give up what this node owns so others take over at once."""
        return None

    def new_session_id(self) -> str:
        return "sess-" + secrets.token_hex(8)

    def fence(self, tenant: str, session_id: str) -> Any:
        """The token a checkpoint of this session is written under (see :mod:`.state_store`)."""
        return None

    @abc.abstractmethod
    def owner(self, tenant: str, session_id: str) -> Owner | None:
        """The session's owner by what this node knows now; None: nobody owns it."""

    async def claim(self, tenant: str, session_id: str) -> Owner:
        """Make this node the owner of an unowned session; the owner if another won."""
        owner = self.owner(tenant, session_id)
        if owner is None:
            raise RuntimeError(f"{type(self).__name__} cannot claim sessions")
        return owner

    async def release(self, tenant: str, session_id: str, *, ended: bool = True) -> None:
        """This node no longer has the session: it ``ended`` (closed), or was let go of."""
        return None

    def forget(self, tenant: str, session_id: str) -> None:
        """Drop what this node remembers of the session's owner (it proved stale)."""
        return None

    def checkpoint_absent(self, tenant: str, session_id: str, *, take: bool = False) -> bool:
        """True when this node's claim of the session proved it has no checkpoint (the
        claim read it in the same transaction), so the state store need not be asked;
        ``take``: the session is being created, the proof is used up."""
        return False

    def check_serving(self) -> None:
        """Raise ServiceUnavailableError while this node must not serve turns (lease lost)."""
        return None

    def members(self) -> Sequence[Member]:
        """Every node, this one included."""
        return [Member(self.node_id, None)]

    def machine_members(self) -> Sequence[Member]:
        """The nodes on this machine (the workers whose ``/metrics`` add up here)."""
        return self.members()

    def check_caller_id(self, session_id: str) -> None:
        if self.multi_node:
            check_caller_session_id(session_id)


class SingleNode(Placement):
    """One node: every session is local."""

    def __init__(self) -> None:
        self._local = Owner("local", True)

    def owner(self, tenant: str, session_id: str) -> Owner:
        return self._local


class WorkerSet(Placement):
    """``serve --workers N`` on one machine: a fixed set of workers, no engine.

    Worker ``i`` owns the ids it generated (``.w<i>``). A caller-named id is
    owned by the worker that first used it: it claims the name in a small
    SQLite table shared by the workers (``<data dir>/claims.sqlite3``, one
    ``INSERT OR IGNORE``), so a client that keeps its connection -- which
    stays with one worker -- finds its named sessions on that worker and
    nothing is forwarded. The others reach worker ``i`` on its Unix socket
    ``<run_dir>/w<i>.sock``. The set never changes while the machine runs (a
    worker that dies is restarted in its slot, keeping its claims), and a
    restarted worker finds its sessions in the shared checkpoint store.
    """

    multi_node = True

    def __init__(self, index: int, count: int, run_dir: Path) -> None:
        if not 0 <= index < count:
            raise ValueError(f"worker index {index} is not in 0..{count - 1}")
        self.index = index
        self.count = count
        self.run_dir = Path(run_dir)
        self.node_id = f"w{index}"
        self._owners = [
            Owner(f"w{i}", i == index, f"unix:{self.socket_path(i)}") for i in range(count)
        ]
        self._claims: dict[tuple[str, str], int] = {}
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    @property
    def claims_path(self) -> Path:
        return self.run_dir.parent / "claims.sqlite3"

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        def connect() -> None:
            db = sqlite3.connect(self.claims_path, check_same_thread=False, timeout=30.0)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS claims (tenant TEXT NOT NULL, session_id TEXT NOT NULL,"
                " worker INTEGER NOT NULL, PRIMARY KEY (tenant, session_id))"
            )
            db.commit()
            self._db = db

        await anyio.to_thread.run_sync(connect)

    async def close(self) -> None:
        def disconnect() -> None:
            with self._lock:
                if self._db is not None:
                    self._db.close()
                    self._db = None

        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(disconnect)

    def socket_path(self, index: int) -> Path:
        return self.run_dir / f"w{index}.sock"

    def new_session_id(self) -> str:
        return f"sess-{secrets.token_hex(8)}.{self.node_id}"

    def owner(self, tenant: str, session_id: str) -> Owner | None:
        home = home_of(session_id)
        if home is not None and home.startswith("w") and home[1:].isdigit():
            index = int(home[1:])
            if index < self.count:
                return self._owners[index]
        claimed = self._claims.get((tenant, session_id))
        return self._owners[claimed] if claimed is not None else None

    async def claim(self, tenant: str, session_id: str) -> Owner:
        """Mine if no worker has used this name yet, else the worker that has."""

        def insert_or_read() -> int:
            with self._lock:
                db = self._db
                if db is None:
                    raise RuntimeError("the worker's claims table is not open")
                with db:
                    db.execute(
                        "INSERT OR IGNORE INTO claims VALUES (?, ?, ?)",
                        (tenant, session_id, self.index),
                    )
                    row = db.execute(
                        "SELECT worker FROM claims WHERE tenant = ? AND session_id = ?",
                        (tenant, session_id),
                    ).fetchone()
            return int(row[0])

        index = await anyio.to_thread.run_sync(insert_or_read)
        if index >= self.count:  # claimed under a larger --workers: take it over
            index = self.index
        if len(self._claims) >= 1_000_000:
            self._claims.clear()
        self._claims[(tenant, session_id)] = index
        return self._owners[index]

    async def release(self, tenant: str, session_id: str, *, ended: bool = True) -> None:
        """A closed session's name is free again; a session let go of keeps its worker."""
        if not ended or home_of(session_id) is not None:
            return
        self._claims.pop((tenant, session_id), None)

        def delete() -> None:
            with self._lock:
                if self._db is not None:
                    with self._db:
                        self._db.execute(
                            "DELETE FROM claims WHERE tenant = ? AND session_id = ?",
                            (tenant, session_id),
                        )

        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(delete)

    def forget(self, tenant: str, session_id: str) -> None:
        self._claims.pop((tenant, session_id), None)

    def members(self) -> Sequence[Member]:
        return [Member(o.node, o.address) for o in self._owners]
