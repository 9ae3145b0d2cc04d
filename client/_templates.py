"""Templates: list and get them through a TTL cache, deploy and delete them."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import anyio
import anyio.to_thread

from ppio_sandbox.agent_runtime.errors import InvocationTimeoutError, ValidationError
from ppio_sandbox.agent_runtime.packaging import AGENT_FILE, pack_directory

from ._connection import ApiConnection
from ._models import AgentTemplate, convert

if TYPE_CHECKING:
    from ._client import AgentRuntimeClient

__all__ = ["TemplateManager"]

_POLL_FIRST = 0.05
_POLL_MAX = 1.0


def _template_path(template_id: str) -> str:
    return f"/v1/templates/{quote(template_id, safe='')}"


def _pack(path: Path) -> bytes:
    """Pack an agent directory, given as itself or as its ``.ppio-agent.yaml``."""
    if path.name == AGENT_FILE and path.is_file():
        path = path.parent
    return pack_directory(path)


class TemplateManager:
    """The templates a client can see, cached for ``ttl`` seconds.

    A second :meth:`list_templates` within the TTL makes no request;
    ``refresh=True`` or :meth:`invalidate` forces one, and deploying or
    deleting a template invalidates the cache. :meth:`get_template` caches
    only settled templates (deployed or failed), so a build in progress is
    always fetched fresh.

    Every client has one (``client.templates``); ``TemplateManager(client)``
    makes another over the same connection, with a cache of its own (by
    default as the client's ``enable_cache`` and ``cache_ttl`` say):

    >>> async def main(client):  # doctest: +SKIP
    ...     templates = TemplateManager(client)
    ...     print([t.template_id for t in await templates.list_templates() if t.deployed])
    ...     print((await templates.get_template("assistant")).phase)
    """

    def __init__(
        self,
        conn: ApiConnection | AgentRuntimeClient,
        *,
        enabled: bool | None = None,
        ttl: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(conn, ApiConnection):
            inner = getattr(conn, "_conn", None)
            if not isinstance(inner, ApiConnection):
                raise TypeError(
                    f"TemplateManager needs an AgentRuntimeClient, not {type(conn).__name__}"
                )
            conn = inner
        enabled = conn.config.enable_cache if enabled is None else enabled
        ttl = conn.config.cache_ttl if ttl is None else ttl
        self._conn = conn
        self._enabled = enabled and ttl > 0
        self._ttl = ttl
        self._clock = clock
        self._list: tuple[float, list[AgentTemplate]] | None = None
        self._by_id: dict[str, tuple[float, AgentTemplate]] = {}

    def invalidate(self, template_id: str | None = None) -> None:
        """Forget the cached list, and one cached template (every one without an id)."""
        self._list = None
        if template_id is None:
            self._by_id.clear()
        else:
            self._by_id.pop(template_id, None)

    def _fresh(self, stamp: float) -> bool:
        return self._enabled and self._clock() - stamp < self._ttl

    async def list_templates(self, *, refresh: bool = False) -> list[AgentTemplate]:
        """Every template this client's tenant can use (its own, then the shared ones)."""
        if not refresh and self._list is not None and self._fresh(self._list[0]):
            return list(self._list[1])
        reply = await self._conn.call("GET", "/v1/templates")
        views = reply.get("templates", []) if isinstance(reply, dict) else []
        templates = [convert(view, AgentTemplate) for view in views]
        if self._enabled:
            now = self._clock()
            self._list = (now, templates)
            for template in templates:
                if template.settled:
                    self._by_id[template.template_id] = (now, template)
        return list(templates)

    async def get_template(self, template_id: str, *, refresh: bool = False) -> AgentTemplate:
        """One template by id (or agent name); :class:`TemplateNotFoundError` if unknown."""
        cached = self._by_id.get(template_id)
        if not refresh and cached is not None and self._fresh(cached[0]):
            return cached[1]
        template = convert(await self._conn.call("GET", _template_path(template_id)), AgentTemplate)
        if self._enabled and template.settled:
            self._by_id[template_id] = (self._clock(), template)
        return template

    async def deploy(
        self,
        path: str | Path,
        *,
        wait: bool = True,
        timeout: float | None = None,
    ) -> AgentTemplate:
        """Upload an agent directory (or its ``.ppio-agent.yaml``) and wait for its build.

        The directory is packed into the same deterministic tar.gz the
        orchestrator makes, so unchanged content keeps its template id. With
        ``wait`` the template is polled until ``deployed``; a ``failed`` build
        raises :class:`ValidationError` with the server's error, and no result
        within ``timeout`` (default ``ClientConfig.deploy_timeout``) raises
        :class:`InvocationTimeoutError`.
        """
        archive = await anyio.to_thread.run_sync(_pack, Path(path))
        budget = self._conn.config.deploy_timeout if timeout is None else timeout
        deadline = anyio.current_time() + budget
        view = await self._conn.call(
            "POST",
            "/v1/templates",
            content=archive,
            content_type="application/gzip",
            idempotent=True,  # content-addressed: the same archive is the same template
            timeout=budget,
        )
        template = convert(view, AgentTemplate)
        self.invalidate(template.template_id)
        if not wait:
            return template
        delay = _POLL_FIRST
        while not template.settled:
            if anyio.current_time() + delay >= deadline:
                raise InvocationTimeoutError(
                    f"template {template.template_id} is still {template.phase} after {budget:g} s"
                )
            await anyio.sleep(delay)
            delay = min(delay * 2, _POLL_MAX)
            remaining = max(deadline - anyio.current_time(), 1e-3)
            view = await self._conn.call(
                "GET", _template_path(template.template_id), timeout=remaining
            )
            template = convert(view, AgentTemplate)
        self.invalidate(template.template_id)
        if template.phase == "failed":
            raise ValidationError(
                f"template {template.template_id} failed to deploy: {template.error}",
                details={"template_id": template.template_id, "build_log": template.build_log},
            )
        return template

    async def delete(self, template_id: str) -> None:
        """Delete a template; its sessions are closed."""
        await self._conn.call("DELETE", _template_path(template_id))
        self.invalidate(template_id)
