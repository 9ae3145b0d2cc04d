"""A node of an etcd cluster: membership under a lease, claims, fences.

Keys (under the cluster's prefix, ``/ppio`` by default)::

    members/<node>            {"address", "machine", ...}     bound to the node's lease
    owners/<tenant>/<session> {"node", "incarnation"}          bound to the owner's lease
    sessions/<tenant>/<session>   the checkpoint (msgpack)    (.etcd_store)

A node joins by putting its member key under a lease of ``ttl`` seconds
that it renews every ``ttl/3``; the key's create revision is its
*incarnation*, which tells a restarted node from its previous life. Every
node follows ``members/`` and ``owners/`` through a watch, so routing reads
memory, never etcd.

Who owns a session (see :mod:`..placement`): a claim key if there is one;
else the incarnation named in a generated id, while that incarnation's
member key exists. A session without a living owner is claimed with one
transaction: *if no claim exists and the home incarnation is gone, put my
claim under my lease*. Two nodes racing on one id, or on a dead node's
session, cannot both win.

Fencing. A checkpoint is written only if the writer still owns the session,
checked in the same transaction: for a claimed session, that its claim key
still has the create revision it got; for a session at home, that the
node's member key still has its incarnation and no claim exists. A node
that cannot renew its lease stops serving turns before the lease can have
expired (:class:`~._etcd.LeaseKeeper` keeps ``valid_until`` on the safe
side of the clock), evicts its sessions and joins again as a new
incarnation; its sessions are claimed afresh by whoever is asked for them
next, and come back from their last checkpoint. Two owners at once would
need etcd to lose a committed write.
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import quote

import anyio
import anyio.abc

from ppio_sandbox.agent_runtime.errors import ServiceUnavailableError

from ..placement import Member, Owner, Placement, home_of
from ._etcd import (
    Compare,
    EtcdClient,
    EtcdError,
    KeyValue,
    LeaseKeeper,
    Op,
    PrefixCache,
    RangeResult,
)

__all__ = ["ClusterPlacement", "Fence", "member_key", "owner_key", "session_key"]

logger = logging.getLogger("ppio_sandbox.orchestrator.cluster")

Fence = tuple[Any, ...]
"""("home", member key, incarnation, owner key) or ("claim", owner key, revision)."""


def _part(text: str) -> str:
    return quote(text, safe="")


def member_key(prefix: str, node: str) -> bytes:
    return f"{prefix}/members/{node}".encode()


def owner_key(prefix: str, tenant: str, session_id: str) -> bytes:
    return f"{prefix}/owners/{_part(tenant)}/{session_id}".encode()


def session_key(prefix: str, tenant: str, session_id: str) -> bytes:
    return f"{prefix}/sessions/{_part(tenant)}/{session_id}".encode()


_CLAIMS_PER_TXN = 40
"""Claims per transaction: 2 compares and 2 ops each, under etcd's 128 ops a txn."""


class _Claim:
    """A claim asked for and not settled yet; every request for the id waits on it."""

    __slots__ = ("done", "error", "owner", "session_id", "tenant")

    def __init__(self, tenant: str, session_id: str) -> None:
        self.tenant = tenant
        self.session_id = session_id
        self.done = anyio.Event()
        self.owner: Owner | None = None
        self.error: Exception | None = None

    def settle(self, owner: Owner) -> None:
        if not self.done.is_set():
            self.owner = owner
            self.done.set()

    def fail(self, error: Exception) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


def coordinator_unavailable(what: str, why: object, retry_after: float) -> ServiceUnavailableError:
    """etcd failing is a retryable 503 for the request that needed it, never a 500."""
    return ServiceUnavailableError(
        f"{what}: the cluster's coordinator (etcd) did not answer ({why})",
        retry_after=retry_after,
    )


def _b36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
        if not number:
            return out


class ClusterPlacement(Placement):
    """This node's view of the cluster; see the module docstring."""

    multi_node = True
    ownership_moves = True

    def __init__(
        self,
        client: EtcdClient,
        *,
        node_id: str,
        address: str,
        internal: str | None = None,
        machine: str | None = None,
        prefix: str = "/ppio",
        ttl: float = 5.0,
        on_lost: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.client = client
        self.node_id = node_id
        self.address = address
        self.internal = internal  # this node's Unix socket, for workers of the same machine
        self.machine = machine or socket.gethostname()
        self.prefix = prefix.rstrip("/")
        self.ttl = max(1, round(ttl))
        self.retry_after = float(self.ttl)
        self.on_lost = on_lost
        self.incarnation = ""
        self.keeper: LeaseKeeper | None = None
        self._members = PrefixCache(client, f"{self.prefix}/members/".encode())
        self._owners = PrefixCache(client, f"{self.prefix}/owners/".encode())
        self._claims: dict[tuple[str, str], int] = {}  # my claims: their create revisions
        self._absent: set[tuple[str, str]] = set()
        """My claims whose transaction found no checkpoint (see :meth:`checkpoint_absent`)."""
        self._claiming: dict[tuple[str, str], _Claim] = {}  # asked for, not settled yet
        self._queued: list[_Claim] = []  # of those, not sent yet
        self._claims_wanted = anyio.Event()
        # A claim waits for at most its group's transaction and the one before it.
        self._claim_wait = 2 * client.timeout + 1.0
        self._serving = False
        self.joined = anyio.Event()

    # -- joining and leaving ------------------------------------------------

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        await tg.start(self._members.run)
        await tg.start(self._owners.run)
        await self._join()
        tg.start_soon(self._keep)
        tg.start_soon(self._commit_claims)

    async def _join(self) -> None:
        """Put this node's member key under a fresh lease (waiting out a previous life)."""
        key = member_key(self.prefix, self.node_id)
        value = json.dumps(
            {
                "node": self.node_id,
                "address": self.address,
                "internal": self.internal,
                "machine": self.machine,
            }
        ).encode()
        deadline = anyio.current_time() + self.ttl * 3 + 10
        while True:
            keeper = await LeaseKeeper.grant(self.client, self.ttl)
            result = await self.client.txn(
                [Compare.create_revision(key, "==", 0)],
                [Op.put(key, value, lease=keeper.lease_id)],
                [Op.range(key)],
            )
            if result.succeeded:
                break
            await self.client.revoke(keeper.lease_id)
            if anyio.current_time() > deadline:
                raise SystemExit(
                    f"node id {self.node_id!r} is already a member of the cluster; "
                    "choose another --node-id"
                )
            logger.info("node %s: waiting for the previous incarnation to expire", self.node_id)
            await anyio.sleep(0.5)
        self.keeper = keeper
        self.incarnation = _b36(result.revision)
        self._claims.clear()
        self._absent.clear()
        self._serving = True
        self.joined.set()
        logger.info(
            "node %s joined the cluster (incarnation %s, lease %.0f s)",
            self.node_id,
            self.incarnation,
            self.ttl,
        )

    async def _keep(self) -> None:
        """Renew the lease; when it is lost, stop serving, let go of everything, rejoin."""
        while True:
            keeper = self.keeper
            assert keeper is not None
            async with anyio.create_task_group() as tg:
                tg.start_soon(keeper.run)
                await keeper.lost.wait()
                tg.cancel_scope.cancel()
            self._serving = False
            logger.error(
                "node %s lost its lease (%s): its sessions are not served here any more",
                self.node_id,
                keeper.lost_reason,
            )
            if self.on_lost is not None:
                with anyio.CancelScope(shield=True):
                    await self.on_lost()
            revoked = False
            while True:
                try:
                    if not revoked:
                        # Nothing is served under it any more: let its member key and
                        # claims go now, rather than wait out the TTL that etcd may have
                        # extended (a new etcd leader renews every lease).
                        await self.client.revoke(keeper.lease_id)
                        revoked = True
                    await self._join()
                    break
                except (EtcdError, OSError) as exc:
                    logger.warning("node %s: rejoining failed (%s); retrying", self.node_id, exc)
                    await anyio.sleep(1.0)

    async def close(self) -> None:
        """Leave: revoke the lease, so the member key and every claim go at once."""
        self._serving = False
        keeper = self.keeper
        if keeper is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                try:
                    await self.client.revoke(keeper.lease_id)
                except EtcdError as exc:
                    logger.warning("leaving the cluster: %s (the lease expires by itself)", exc)

    async def shared_token(self) -> str:
        """The cluster's internal token: the first node to ask stores a random one."""
        key = f"{self.prefix}/token".encode()
        fresh = secrets.token_urlsafe(24).encode()
        result = await self.client.txn(
            [Compare.create_revision(key, "==", 0)], [Op.put(key, fresh)], [Op.range(key)]
        )
        if result.succeeded:
            return fresh.decode()
        existing = result.responses[0]
        assert isinstance(existing, RangeResult)
        assert existing.kvs
        return existing.kvs[0].value.decode()

    # -- ownership ----------------------------------------------------------

    def new_session_id(self) -> str:
        return f"sess-{secrets.token_hex(8)}.{self.node_id}.{self.incarnation}"

    def check_serving(self) -> None:
        keeper = self.keeper
        if not self._serving or keeper is None or not keeper.alive:
            raise ServiceUnavailableError(
                f"node {self.node_id} cannot reach the cluster's coordinator (etcd); its "
                "sessions move to another node shortly",
                retry_after=self.retry_after,
            )

    def _member(self, node: str) -> tuple[KeyValue, dict[str, Any]] | None:
        kv = self._members.items.get(member_key(self.prefix, node))
        if kv is None:
            return None
        return kv, json.loads(kv.value)

    def _owner_of_member(self, node: str, fence: Any = None) -> Owner:
        if node == self.node_id:
            return Owner(node, True, None, fence)
        found = self._member(node)
        info = found[1] if found else {}
        address = info.get("address")
        if info.get("internal") and info.get("machine") == self.machine:
            address = info["internal"]  # a worker on this machine: its Unix socket
        return Owner(node, False, address)

    def owner(self, tenant: str, session_id: str) -> Owner | None:
        key = owner_key(self.prefix, tenant, session_id)
        mine = self._claims.get((tenant, session_id))
        if mine is not None:
            return Owner(self.node_id, True, None, ("claim", key, mine))
        claim = self._owners.items.get(key)
        if claim is not None:
            holder = json.loads(claim.value)
            if holder.get("node") == self.node_id:
                if holder.get("incarnation") == self.incarnation:
                    self._claims[(tenant, session_id)] = claim.create_revision
                    return Owner(self.node_id, True, None, ("claim", key, claim.create_revision))
                return None  # my previous life's claim: its lease is gone or going
            return self._owner_of_member(str(holder.get("node")))
        home = home_of(session_id)
        if home is None or "." not in home:
            return None
        node, _, incarnation = home.rpartition(".")
        if node == self.node_id and incarnation == self.incarnation:
            fence = ("home", member_key(self.prefix, node), _rev(incarnation), key)
            return Owner(node, True, None, fence)
        found = self._member(node)
        if found is not None and _b36(found[0].create_revision) == incarnation:
            return self._owner_of_member(node)
        return None  # its home node is gone: whoever is asked claims it

    async def claim(self, tenant: str, session_id: str) -> Owner:
        """One transaction: mine if nobody owns it, else whoever does.

        Won, it also reads the session's checkpoint key: absent, the session is new
        and creating it here asks the state store nothing (:meth:`checkpoint_absent`).
        Nobody else writes that key while the claim holds (checkpoints are fenced
        by it), so the answer stays true until this node creates the session.

        Claims are committed in groups: those asked for while a transaction is in
        flight go together in the next one (up to ``_CLAIMS_PER_TXN``), so many
        callers creating sessions at once cost etcd one raft write per group, not
        one each. Two requests here for one id share one claim.
        """
        self.check_serving()
        key = (tenant, session_id)
        pending = self._claiming.get(key)
        if pending is None:
            pending = self._claiming[key] = _Claim(tenant, session_id)
            self._queued.append(pending)
            self._claims_wanted.set()
        with anyio.move_on_after(self._claim_wait):
            await pending.done.wait()
        if not pending.done.is_set():
            raise self._not_placed(pending, f"waited {self._claim_wait:g} s")
        if pending.error is not None:
            raise pending.error
        assert pending.owner is not None
        return pending.owner

    async def _commit_claims(self) -> None:
        """The one task that sends claims to etcd, a group per transaction."""
        try:
            while True:
                await self._claims_wanted.wait()
                self._claims_wanted = anyio.Event()
                while self._queued:
                    group = self._queued[:_CLAIMS_PER_TXN]
                    del self._queued[: len(group)]
                    try:
                        await self._settle(group)
                    except Exception as exc:  # a bug: told to every caller, not lost
                        for pending in group:
                            pending.fail(exc)
                    finally:
                        for pending in group:
                            if not pending.done.is_set():  # cancelled mid-way
                                pending.fail(self._not_placed(pending, "stopped"))
                            self._claiming.pop((pending.tenant, pending.session_id), None)
        finally:
            for pending in self._queued:
                pending.fail(self._not_placed(pending, "stopped"))
                self._claiming.pop((pending.tenant, pending.session_id), None)
            self._queued.clear()

    def _not_placed(self, pending: _Claim, why: object) -> ServiceUnavailableError:
        return coordinator_unavailable(
            f"session {pending.session_id} cannot be placed", why, self.retry_after
        )

    async def _settle(self, group: list[_Claim]) -> None:
        """Claim ``group`` in one transaction. If it fails, those whose ids are held
        learn their holder and the rest go again as a group; if none was held, an
        id's home node is alive: those with a home go one by one (all rare races)."""
        assert self.keeper is not None
        value = json.dumps({"node": self.node_id, "incarnation": self.incarnation}).encode()
        compares: list[Compare] = []
        success: list[Op] = []
        failure: list[Op] = []
        for pending in group:
            key = owner_key(self.prefix, pending.tenant, pending.session_id)
            compares.append(Compare.create_revision(key, "==", 0))
            home = home_of(pending.session_id)
            if home is not None and "." in home:
                node, _, incarnation = home.rpartition(".")
                compares.append(
                    Compare.create_revision(member_key(self.prefix, node), "!=", _rev(incarnation))
                )
            checkpoint = session_key(self.prefix, pending.tenant, pending.session_id)
            success += [
                Op.put(key, value, lease=self.keeper.lease_id),
                Op.range(checkpoint, keys_only=True),
            ]
            failure.append(Op.range(key))
        try:
            result = await self.client.txn(compares, success, failure)
        except EtcdError as exc:
            for pending in group:
                pending.fail(self._not_placed(pending, exc))
            return
        if result.succeeded:
            for i, pending in enumerate(group):
                mine = (pending.tenant, pending.session_id)
                self._claims[mine] = result.revision
                found = result.responses[2 * i + 1] if len(result.responses) > 2 * i + 1 else None
                if isinstance(found, RangeResult) and not found.kvs:
                    self._absent.add(mine)
                fence = ("claim", owner_key(self.prefix, *mine), result.revision)
                pending.settle(Owner(self.node_id, True, None, fence))
            return
        unknown = []
        for i, pending in enumerate(group):
            existing = result.responses[i] if len(result.responses) > i else None
            if isinstance(existing, RangeResult) and existing.kvs:
                try:
                    pending.settle(self._held(pending, existing.kvs[0]))
                except ServiceUnavailableError as exc:
                    pending.fail(exc)
            elif len(group) == 1:  # not held: its home incarnation is alive
                home = home_of(pending.session_id)
                assert home is not None
                pending.settle(self._owner_of_member(home.rpartition(".")[0]))
            else:
                unknown.append(pending)
        if len(unknown) < len(group):  # the held ones are out: the rest as a group again
            if unknown:
                await self._settle(unknown)
            return
        # Nothing was held, so an id's home incarnation is alive: find which, one by one.
        homed = [pending for pending in unknown if "." in (home_of(pending.session_id) or "")]
        for pending in homed:
            await self._settle([pending])
        rest = [pending for pending in unknown if pending not in homed]
        if rest:
            await self._settle(rest)

    def _held(self, pending: _Claim, kv: KeyValue) -> Owner:
        """Who holds a claim that exists already."""
        holder = json.loads(kv.value)
        if holder.get("node") == self.node_id:
            if holder.get("incarnation") == self.incarnation:
                # A claim from here won earlier (a retry of an unanswered one): it is ours.
                key = (pending.tenant, pending.session_id)
                revision = self._claims.setdefault(key, kv.create_revision)
                fence = ("claim", owner_key(self.prefix, *key), revision)
                return Owner(self.node_id, True, None, fence)
            raise ServiceUnavailableError(
                f"session {pending.session_id} is still held by this node's previous life; "
                "it is released within the lease TTL",
                retry_after=self.retry_after,
            )
        return self._owner_of_member(str(holder.get("node")))

    async def release(self, tenant: str, session_id: str, *, ended: bool = True) -> None:
        """Give up this node's claim (closed, or let go of: either way another may take it)."""
        self._absent.discard((tenant, session_id))
        revision = self._claims.pop((tenant, session_id), None)
        if revision is None:
            return
        key = owner_key(self.prefix, tenant, session_id)
        try:
            await self.client.txn(
                [Compare.create_revision(key, "==", revision)], [Op.delete(key)], []
            )
        except EtcdError as exc:  # the claim goes with the lease anyway
            logger.warning("releasing %s failed: %s", session_id, exc)

    def forget(self, tenant: str, session_id: str) -> None:
        self._claims.pop((tenant, session_id), None)
        self._absent.discard((tenant, session_id))

    def checkpoint_absent(self, tenant: str, session_id: str, *, take: bool = False) -> bool:
        key = (tenant, session_id)
        if key not in self._absent:
            return False
        if key not in self._claims:  # the claim is gone: so is what it proved
            self._absent.discard(key)
            return False
        if take:
            self._absent.discard(key)
        return True

    def fence(self, tenant: str, session_id: str) -> Fence | None:
        owner = self.owner(tenant, session_id)
        return owner.fence if owner is not None and owner.local else None

    # -- views --------------------------------------------------------------

    def members(self) -> Sequence[Member]:
        out = []
        for kv in self._members.items.values():
            info = json.loads(kv.value)
            out.append(
                Member(
                    node=str(info.get("node")),
                    address=info.get("address"),
                    incarnation=_b36(kv.create_revision),
                    machine=str(info.get("machine", "")),
                )
            )
        return out

    def machine_members(self) -> Sequence[Member]:
        own = []
        for kv in self._members.items.values():
            info = json.loads(kv.value)
            if info.get("machine") == self.machine and info.get("internal"):
                own.append(Member(str(info["node"]), info["internal"]))
        return own


def _rev(incarnation: str) -> int:
    try:
        return int(incarnation, 36)
    except ValueError:
        return -1
