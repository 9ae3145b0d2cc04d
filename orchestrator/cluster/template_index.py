"""Templates shared by the nodes of a cluster, through etcd.

A template deployed on one node must run on every node: requests reach any
node, and sessions move when their node dies. Each node keeps its own
template store (files and SQLite in its data dir); this index makes a
deploy on one node visible to the others:

    templates/<tenant>/<id>   {"id", "name", "digest", "deployed_at"}
    archives/<digest>         the template's archive (tar.gz), as uploaded

A node asked for a template it does not have looks it up here, fetches the
archive, stores and smoke-tests it like an upload, and serves it; the
content digest checks that what it runs is what was deployed. Archives are
kept in etcd, so a template stays available when the node that took the
upload is gone -- which limits them to :data:`MAX_ARCHIVE_BYTES` in a
cluster (templates are source files; dependencies belong in the sandbox's
interpreter). Operators usually start every node with the same
``--template`` directories, which then need no fetching at all.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any
from urllib.parse import quote

from ppio_sandbox.agent_runtime.errors import RequestTooLargeError

from ._etcd import Compare, EtcdClient, Op

__all__ = ["MAX_ARCHIVE_BYTES", "EtcdTemplateIndex"]

logger = logging.getLogger("ppio_sandbox.orchestrator.cluster")

MAX_ARCHIVE_BYTES = 1024 * 1024
"""The largest template archive a cluster takes (etcd requests stop at 1.5 MiB)."""


class EtcdTemplateIndex:
    """See the module docstring."""

    def __init__(self, client: EtcdClient, prefix: str = "/ppio") -> None:
        self.client = client
        self.prefix = prefix.rstrip("/")

    def _key(self, tenant: str, template_id: str) -> bytes:
        return f"{self.prefix}/templates/{quote(tenant, safe='')}/{template_id}".encode()

    def _archive_key(self, digest: str) -> bytes:
        return f"{self.prefix}/archives/{digest}".encode()

    async def publish(self, template: Any, archive: bytes) -> None:
        """Make a stored template visible to every node (its archive first)."""
        if len(archive) > MAX_ARCHIVE_BYTES:
            raise RequestTooLargeError(
                f"in a cluster a template archive may be at most {MAX_ARCHIVE_BYTES} bytes "
                f"(this one is {len(archive)}): keep dependencies out of the template"
            )
        meta = {
            "id": template.id,
            "name": template.name,
            "digest": template.digest,
            "deployed_at": time.time(),
        }
        archive_key = self._archive_key(template.digest)
        await self.client.txn(
            [Compare.create_revision(archive_key, "==", 0)], [Op.put(archive_key, archive)], []
        )
        await self.client.put(self._key(template.tenant, template.id), json.dumps(meta).encode())

    async def unpublish(self, template: Any) -> None:
        await self.client.delete(self._key(template.tenant, template.id))

    async def find(self, agent_id: str, tenant: str) -> bytes | None:
        """The archive of the tenant's template with this id, or the newest with this name."""
        kv = await self.client.get(self._key(tenant, agent_id))
        meta: dict[str, Any] | None = json.loads(kv.value) if kv is not None else None
        if meta is None:
            kvs, _ = await self.client.get_prefix(self._key(tenant, ""))
            named = [json.loads(kv.value) for kv in kvs]
            named = [m for m in named if m.get("name") == agent_id]
            meta = max(named, key=lambda m: m.get("deployed_at", 0), default=None)
        if meta is None:
            return None
        archive = await self.client.get(self._archive_key(str(meta["digest"])))
        if archive is None:
            logger.warning("template %s is indexed but its archive is missing", meta.get("id"))
            return None
        return archive.value
