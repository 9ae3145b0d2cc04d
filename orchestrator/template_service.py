"""Templates as one node serves them: resolution, builds, sandbox providers.

:class:`TemplateService` stands between the template store (files and rows:
:mod:`.templates`) and the sessions (:mod:`.session_host`, whose
``Provisioner`` it is): it resolves an agent id or name to a deployed
template (cached: session creation is a hot path), smoke-tests new ones,
keeps one sandbox provider (and warm pool) per template version, decides
where uploads may run (:mod:`._policy`), and in a cluster publishes and
fetches templates through the shared index.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from ppio_sandbox.agent_runtime.errors import TemplateNotFoundError

from ._policy import SandboxPolicy
from .sandbox.base import SandboxProvider
from .sandbox.inprocess import InProcessSandboxProvider

__all__ = ["SHARED_TENANT", "TemplateService"]

SHARED_TENANT = "shared"
"""Owner of templates registered at start-up (``serve --template``): every
tenant can start sessions of them; only their own uploads are private."""

logger = logging.getLogger("ppio_sandbox.orchestrator")


class TemplateService:
    """One node's templates. See the module docstring."""

    def __init__(
        self,
        config: Any,
        templates: Any,
        *,
        spawn: Callable[..., None],
        close_sessions: Callable[[str, str, str], Awaitable[None]],
        accepting: Callable[[], None],
    ) -> None:
        self.config = config
        self.templates = templates
        self.spawn = spawn
        self._close_sessions = close_sessions
        self._check_accepting = accepting
        self._providers: dict[str, SandboxProvider] = {}
        self._provider_locks: dict[str, anyio.Lock] = {}
        self._turn_timeouts: dict[tuple[str, str], float] = {}  # (owner, template id)
        self._building: set[tuple[str, str]] = set()
        self._resolved: dict[tuple[str, str], Any] = {}
        self._template_generation = 0
        self.sandbox_policy = SandboxPolicy(trust_uploads=config.trust_uploads)
        self.template_index: Any = None
        """A cluster's shared index (:mod:`.cluster.template_index`), else None."""

    async def close_providers(self) -> None:
        """Close every sandbox provider (warm pools)."""
        for provider in list(self._providers.values()):
            with anyio.move_on_after(10):
                await provider.aclose()
        self._providers.clear()

    async def follow_templates(self) -> None:
        """Workers share one template database: notice the others' changes within a second."""
        while True:
            await anyio.sleep(1.0)
            try:
                if await self.templates.changed_elsewhere():
                    self._templates_changed()
            except Exception as exc:  # a busy database: try again next second
                logger.debug("checking the template database failed: %s", exc)

    # -- templates ----------------------------------------------------------

    async def provider_for(self, template: Any) -> SandboxProvider:
        """The (opened) sandbox provider of a template, created on first use.

        Keyed by owner, id *and* content digest: a template redeployed in place
        under an explicit id gets a fresh provider running the new code, and two
        tenants' templates never share one (nor a warm pool), even under one id.
        """
        key = f"{_scope(template)}{template.digest}"
        provider = self._providers.get(key)
        if provider is not None:
            return provider
        lock = self._provider_locks.setdefault(key, anyio.Lock())
        async with lock:
            provider = self._providers.get(key)
            if provider is None:
                stale = [k for k in self._providers if k.startswith(_scope(template))]
                for old in stale:
                    self.spawn(self._providers.pop(old).aclose)
                provider = self._make_provider(template)
                await provider.open()
                self._providers[key] = provider
                timeout = float(template.spec.runtime.timeout)
                self._turn_timeouts[(template.tenant, template.id)] = timeout
        return provider

    def _make_provider(self, template: Any) -> SandboxProvider:
        spec = template.spec
        if self.sandbox_policy.decide(template).kind == "process":  # uploads: see _policy
            from .sandbox.process import ProcessSandboxProvider

            warm = self.config.warm_pool
            return ProcessSandboxProvider(
                Path(template.path),
                entrypoint=spec.entrypoint,
                command=spec.sandbox.command,
                work_root=self.config.data_dir / "sandboxes",
                warm_pool=spec.sandbox.warm_pool if warm is None else warm,
                env=dict(spec.sandbox.env),
                memory_limit=spec.runtime.memory_limit,
                cpu_limit=spec.runtime.cpu_limit,
                start_timeout=self.config.start_timeout,
                network=spec.sandbox.network,
                isolation=self.config.isolation,
                server=self.config.sandbox_server,
            )
        return InProcessSandboxProvider(
            f"{template.id}_{template.digest[:12]}", Path(template.path), spec.entrypoint
        )

    async def resolve_template(self, agent_id: str, tenant: str) -> Any:
        """The tenant's template by id or name, else a shared one.

        Deployed templates are cached in memory (session creation is a hot
        path and SQLite runs in a worker thread); any template change clears
        the cache.
        """
        cached = self._resolved.get((tenant, agent_id))
        if cached is not None:
            return cached
        generation = self._template_generation
        try:
            template = await self._resolve_here(agent_id, tenant)
        except TemplateNotFoundError:
            template = await self._fetch(agent_id, tenant)  # deployed on another node?
            if template is None:
                raise
        if template.phase == "deployed" and generation == self._template_generation:
            if len(self._resolved) >= 4096:
                self._resolved.clear()
            self._resolved[(tenant, agent_id)] = template
        return template

    async def _resolve_here(self, agent_id: str, tenant: str) -> Any:
        try:
            return await self.templates.resolve(agent_id, tenant)
        except TemplateNotFoundError:
            if tenant == SHARED_TENANT:
                raise
            return await self.templates.resolve(agent_id, SHARED_TENANT)

    async def _fetch(self, agent_id: str, tenant: str) -> Any | None:
        """A template another node of the cluster deployed: stored and built here now."""
        index = self.template_index
        if index is None:
            return None
        for owner in dict.fromkeys((tenant, SHARED_TENANT)):
            archive = await index.find(agent_id, owner)
            if archive is None:
                continue
            template = await self.templates.put_archive(archive, owner)
            if owner == SHARED_TENANT:
                self.sandbox_policy.vouch(template)  # an operator's, on another node
            if template.phase != "deployed":
                await self.build_template(template)
            logger.info("template %s fetched from the cluster", template.id)
            return await self.templates.get(template.id, owner)
        return None

    def _templates_changed(self) -> None:
        self._template_generation += 1
        self._resolved.clear()

    async def list_templates(self, tenant: str) -> list[Any]:
        """The tenant's own templates, then the shared ones it has no copy of.

        The same content has the same id, so a tenant that deploys a shared
        template's directory holds a record of that id too: its own is listed
        (it is the one the tenant's calls use), the shared one is not.
        """
        own = await self.templates.list(tenant)
        if tenant == SHARED_TENANT:
            return list(own)
        mine = {template.id for template in own}
        shared = await self.templates.list(SHARED_TENANT)
        return [*own, *(template for template in shared if template.id not in mine)]

    async def deploy_archive(self, data: bytes, tenant: str) -> Any:
        """Store an uploaded template and smoke-test it in the background."""
        self._check_accepting()
        template = await self.templates.put_archive(data, tenant)
        if self.template_index is not None:
            await self.template_index.publish(template, data)
        self._templates_changed()
        if template.phase == "pending" and (tenant, template.id) not in self._building:
            self.spawn(self.build_template, template)
        return template

    async def register_directory(self, path: Path, tenant: str) -> Any:
        """Register a local template directory (``serve --template``) and build it now."""
        template = await self.templates.register_directory(path, tenant)
        self.sandbox_policy.vouch(template)  # the operator's own: may run in-process
        if template.phase != "deployed":
            await self.build_template(template)
        if self.template_index is not None:
            from .templates import pack_directory

            archive = await anyio.to_thread.run_sync(pack_directory, Path(path))
            await self.template_index.publish(template, archive)
        return await self.templates.get(template.id, tenant)

    async def build_template(self, template: Any) -> None:
        """Smoke-test a template (start a sandbox, ping it): deployed or failed."""
        tenant = template.tenant
        self._building.add((tenant, template.id))
        try:
            await self._build(template, tenant)
        finally:
            self._building.discard((tenant, template.id))

    async def _build(self, template: Any, tenant: str) -> None:
        self._templates_changed()
        await self.templates.set_phase(template.id, "building", tenant=tenant)
        sandbox = None
        try:
            with anyio.fail_after(self.config.start_timeout + 10):
                provider = await self.provider_for(template)
                sandbox = await provider.create(f"smoke-{secrets.token_hex(4)}")
                answer = await sandbox.ping()
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            logger.warning("template %s failed its smoke test: %s", template.id, message)
            await self.drop_provider(template)
            self._templates_changed()
            await self.templates.set_phase(
                template.id, "failed", error=message, log=message[-4096:], tenant=tenant
            )
            return
        finally:
            if sandbox is not None:
                with anyio.CancelScope(shield=True):
                    await sandbox.close()
        await self.templates.set_phase(
            template.id,
            "deployed",
            log=f"smoke test passed: /ping answered {answer}",
            tenant=tenant,
        )
        self._templates_changed()
        logger.info("template %s deployed", template.id)

    async def delete_template(self, template: Any, tenant: str) -> None:
        """Close the tenant's sessions of it, stop its sandboxes, forget it.

        Template ids are per tenant (two tenants may hold one id, and do when they
        upload the same content): one's delete leaves the other's template,
        sessions and sandboxes be.
        """
        await self._close_sessions(template.id, tenant, "closed: its template was deleted")
        await self.templates.delete(template.id, tenant)
        if self.template_index is not None:
            await self.template_index.unpublish(template)
        self._templates_changed()
        await self.drop_provider(template)

    async def drop_provider(self, template: Any) -> None:
        """Close the sandbox providers of this template of its owner (every version)."""
        for key in [k for k in self._providers if k.startswith(_scope(template))]:
            await self._providers.pop(key).aclose()

    # -- the session host's provisioner --------------------------------------

    async def template_by_id(self, template_id: str, tenant: str) -> Any:
        """The template a session of ``tenant`` runs: the tenant's own of that id,
        else the shared one (as :meth:`resolve_template` chose when it was created)."""
        for owner in dict.fromkeys((tenant, SHARED_TENANT)):
            try:
                return await self.templates.get(template_id, owner)
            except TemplateNotFoundError:
                pass
        template = await self._fetch(template_id, tenant)
        if template is None:
            raise TemplateNotFoundError(f"template {template_id!r} not found")
        return template

    def turn_timeout(self, template_id: str, tenant: str) -> float:
        """The template's ``spec.runtime.timeout`` for each turn of a session of ``tenant``."""
        timeouts = self._turn_timeouts
        found = timeouts.get((tenant, template_id))
        if found is None:
            found = timeouts.get((SHARED_TENANT, template_id), 300.0)
        return found


def _scope(template: Any) -> str:
    """The start of the keys of a template's providers: its owner and id."""
    return f"{template.tenant}/{template.id}@"
