"""Session checkpoints in etcd, written only under their owner's fence.

The shared store of a cluster: a node that takes a dead node's session over
reads its checkpoint from here. One key per session,
``<prefix>/sessions/<tenant>/<id>``, holding the msgpack record; a batch of
checkpoints is one transaction whose compares are their fences (see
:mod:`.membership`): if any fence fails, the batch is retried one by one so
that only the sessions this node lost are refused.

Limits of etcd as a state store: a request carries at most 1.5 MiB (a
record over :data:`MAX_RECORD_BYTES` is refused with a warning and a metric,
its previous checkpoint kept), a transaction at most 128 operations, and
the whole database 2 GiB by default (``--quota-backend-bytes``). Small
states -- conversation summaries, counters, ids -- fit; a state that holds
documents belongs in a store made for them (the :class:`StateStore`
interface takes another engine).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from ..state_store import Checkpoint, SessionRecord, StateStore, decode_record
from ._etcd import Compare, EtcdClient, EtcdError, Op
from .membership import coordinator_unavailable, session_key

__all__ = ["MAX_RECORD_BYTES", "EtcdStateStore"]

logger = logging.getLogger("ppio_sandbox.orchestrator.cluster")

MAX_RECORD_BYTES = 1024 * 1024
"""The largest checkpoint written to etcd (its requests stop at 1.5 MiB, base64 included)."""

_BATCH = 40  # sessions per txn: 2 compares and 1 put each, plus one, stay under 128 ops


def _compares(fence: Any) -> list[Compare]:
    if not fence:
        return []
    if fence[0] == "claim":
        _, owner, revision = fence
        return [Compare.create_revision(owner, "==", revision)]
    _, member, incarnation, owner = fence
    return [
        Compare.create_revision(member, "==", incarnation),
        Compare.create_revision(owner, "==", 0),
    ]


@contextlib.contextmanager
def _unavailable(what: str, retry_after: float) -> Iterator[None]:
    """etcd failing is a retryable 503 for the request that needed it, never a 500."""
    try:
        yield
    except EtcdError as exc:
        raise coordinator_unavailable(what, exc, retry_after) from None


class EtcdStateStore(StateStore):
    """See the module docstring."""

    max_record_bytes = MAX_RECORD_BYTES

    def __init__(self, client: EtcdClient, prefix: str = "/ppio", retry_after: float = 1.0) -> None:
        self.client = client
        self.prefix = prefix.rstrip("/")
        self.retry_after = retry_after

    async def load(self, tenant: str, session_id: str) -> SessionRecord | None:
        with _unavailable(f"session {session_id} cannot be read", self.retry_after):
            kv = await self.client.get(session_key(self.prefix, tenant, session_id))
        return decode_record(kv.value) if kv is not None else None

    async def save(self, batch: Sequence[Checkpoint]) -> list[bool]:
        results: list[bool] = []
        for start in range(0, len(batch), _BATCH):
            results += await self._save(batch[start : start + _BATCH])
        return results

    async def _save(self, batch: Sequence[Checkpoint]) -> list[bool]:
        writable = [c for c in batch if len(c.data) <= MAX_RECORD_BYTES]
        for checkpoint in batch:
            if len(checkpoint.data) > MAX_RECORD_BYTES:
                logger.warning(
                    "session %s: its checkpoint (%d bytes) is over etcd's %d; not written",
                    checkpoint.record.session_id,
                    len(checkpoint.data),
                    MAX_RECORD_BYTES,
                )
        if writable:
            compares: list[Compare] = []
            for checkpoint in writable:
                for compare in _compares(checkpoint.fence):
                    if compare not in compares:
                        compares.append(compare)
            puts = [Op.put(self._key(c.record), c.data) for c in writable]
            result = await self.client.txn(compares, puts, [])
            if not result.succeeded:
                if len(writable) == 1:
                    return [False if c is writable[0] else c in writable for c in batch]
                ok = {id(c): (await self._save([c]))[0] for c in writable}  # find the losers
                return [ok.get(id(c), False) for c in batch]
        return [c in writable for c in batch]

    def _key(self, record: SessionRecord) -> bytes:
        return session_key(self.prefix, record.tenant, record.session_id)

    async def delete(self, tenant: str, session_id: str, fence: Any = None) -> None:
        key = session_key(self.prefix, tenant, session_id)
        with _unavailable(f"session {session_id} cannot be deleted", self.retry_after):
            await self.client.txn(_compares(fence), [Op.delete(key)], [])

    async def list(self, tenant: str | None = None) -> list[SessionRecord]:
        scope = f"{self.prefix}/sessions/" if tenant is None else None
        if tenant is not None:
            scope = session_key(self.prefix, tenant, "").decode()
        assert scope is not None
        with _unavailable("sessions cannot be listed", self.retry_after):
            kvs, _ = await self.client.get_prefix(scope.encode())
        return [decode_record(kv.value) for kv in kvs]
