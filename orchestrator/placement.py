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
  id: among the fixed workers of one machine it belongs to the worker its
  name hashes to; in a cluster the first node to use it *claims* it with one
  etcd transaction (:mod:`.cluster.membership`), and so does a node that
  takes over a session whose owner died.

Three placements implement the interface: :class:`SingleNode` (the
default: everything is local), :class:`WorkerSet` (``serve --workers N``:
a fixed set of workers, no engine) and the etcd one
(:class:`.cluster.membership.ClusterPlacement`).
"""

from __future__ import annotations

import abc
import re
import secrets
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.abc

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

    async def release(self, tenant: str, session_id: str) -> None:
        """This node no longer has the session (closed, evicted, never created)."""
        return None

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

    Worker ``i`` owns the ids it generated (``.w<i>``) and the caller-named
    ids whose name hashes to it; the others reach it on its Unix socket
    ``<run_dir>/w<i>.sock``. The set never changes while the machine runs
    (a worker that dies is restarted in its slot), so no claim is needed,
    and a restarted worker finds its sessions in the shared checkpoint
    store.
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

    def socket_path(self, index: int) -> Path:
        return self.run_dir / f"w{index}.sock"

    def new_session_id(self) -> str:
        return f"sess-{secrets.token_hex(8)}.{self.node_id}"

    def owner(self, tenant: str, session_id: str) -> Owner:
        home = home_of(session_id)
        if home is not None and home.startswith("w") and home[1:].isdigit():
            index = int(home[1:])
            if index < self.count:
                return self._owners[index]
        return self._owners[zlib.crc32(f"{tenant}/{session_id}".encode()) % self.count]

    def members(self) -> Sequence[Member]:
        return [Member(o.node, o.address) for o in self._owners]
