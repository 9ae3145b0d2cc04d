"""The orchestrator of one node: its templates and the sessions it hosts.

HTTP-free: the front end (``api.py``, ``hotpath.py``) calls these methods.
``async with Orchestrator(config) as host:`` owns one task group in which
every actor task, the expiry reaper, the checkpoint writer and template
builds run. Sessions live in :class:`.session_host.SessionHost`; this class
holds the templates (their store, sandbox providers and builds) and hands the
session host what it needs of them.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

from ppio_sandbox.agent_runtime.errors import TemplateNotFoundError

from ._policy import SandboxPolicy
from .actor import Session
from .checkpoints import Durability
from .directory import SessionDirectory
from .sandbox.base import SandboxProvider
from .sandbox.inprocess import InProcessSandboxProvider
from .session_core import Admission, SessionLimits, Strategy, Turn
from .session_host import Ownership, SessionHost
from .state_store import SessionRecord, SQLiteStateStore, StateStore

__all__ = ["SHARED_TENANT", "Orchestrator", "OrchestratorConfig"]

SHARED_TENANT = "shared"
"""Owner of templates registered at start-up (``serve --template``): every
tenant can start sessions of them; only their own uploads are private."""

logger = logging.getLogger("ppio_sandbox.orchestrator")


@dataclass
class OrchestratorConfig:
    """Settings of one orchestrator host."""

    data_dir: Path = field(default_factory=lambda: Path(".ppio-orchestrator"))
    limits: SessionLimits = field(default_factory=SessionLimits)
    start_timeout: float = 30.0
    shutdown_grace: float = 30.0
    stream_resume_grace: float = 10.0
    """A stream whose reader left is cancelled after this many seconds unless
    a reader comes back (``Last-Event-ID``)."""
    warm_pool: int | None = None
    """Override every process template's warm pool size."""
    trust_uploads: bool = False
    """Let tenants' uploads run in-process (``serve --trust-uploads``); see :mod:`._policy`."""
    durability: Durability = Durability.INTERVAL
    """When sessions are checkpointed (see :mod:`.checkpoints`)."""
    checkpoint_interval: float = 1.0
    """Seconds between checkpoint rounds with ``interval`` durability."""
    isolation: str = "auto"
    """Walls around process sandboxes: ``auto``, ``bwrap`` or ``none`` (an operator's
    choice, never a template's: see :mod:`.sandbox._isolation`)."""


class Orchestrator:
    """Hosts templates and sessions. See the module docstring."""

    def __init__(
        self,
        config: OrchestratorConfig | None = None,
        *,
        templates: Any = None,
        directory: SessionDirectory | None = None,
        store: StateStore | None = None,
        ownership: Ownership | None = None,
        metrics: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config = config or OrchestratorConfig()
        self.clock = clock
        self.templates = templates
        self.metrics = metrics
        if store is None and config.durability is not Durability.NONE:
            store = SQLiteStateStore(
                config.data_dir / "sessions.sqlite3",
                durable=config.durability is Durability.TURN,
            )
        self.sessions = SessionHost(
            self,
            limits=config.limits,
            start_timeout=config.start_timeout,
            stream_resume_grace=config.stream_resume_grace,
            directory=directory,
            store=store,
            durability=config.durability,
            checkpoint_interval=config.checkpoint_interval,
            ownership=ownership,
            metrics=metrics,
            clock=clock,
        )
        self.directory = self.sessions.directory
        self._providers: dict[str, SandboxProvider] = {}
        self._provider_locks: dict[str, anyio.Lock] = {}
        self._turn_timeouts: dict[str, float] = {}
        self._building: set[tuple[str, str]] = set()
        self._resolved: dict[tuple[str, str], Any] = {}
        self._template_generation = 0
        self.sandbox_policy = SandboxPolicy(trust_uploads=self.config.trust_uploads)
        self.template_index: Any = None
        """A cluster's shared index (:mod:`.cluster.template_index`), else None."""
        self._tg: anyio.abc.TaskGroup | None = None

    # -- lifecycle ----------------------------------------------------------

    async def __aenter__(self) -> Orchestrator:
        if self.templates is None:
            from .templates import TemplateStore

            self.templates = TemplateStore(self.config.data_dir)
        await self.templates.open()
        await self.sessions.store.open()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self.sessions.start(self._tg)
        if getattr(self.templates, "shared", False):
            self._tg.start_soon(self._follow_templates)
        if self.metrics is not None:
            self.metrics.bind(
                session_states=self.sessions.count_states,
                mailbox_depth=self.sessions.mailbox_depth,
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        with anyio.CancelScope(shield=True):
            await self.shutdown(grace=0 if exc is not None else None)
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:
            return await self._tg.__aexit__(exc_type, exc, tb)
        finally:
            with anyio.CancelScope(shield=True):
                await self.sessions.store.close()
                await self.templates.close()

    async def _follow_templates(self) -> None:
        """Workers share one template database: notice the others' changes within a second."""
        while True:
            await anyio.sleep(1.0)
            try:
                if await self.templates.changed_elsewhere():
                    self._templates_changed()
            except Exception as exc:  # a busy database: try again next second
                logger.debug("checking the template database failed: %s", exc)

    def spawn(self, func: Callable[..., Any], *args: Any) -> None:
        if self._tg is None:
            raise RuntimeError("the orchestrator is not running (use `async with`)")
        self._tg.start_soon(func, *args)

    @property
    def task_group(self) -> anyio.abc.TaskGroup:
        """The orchestrator's own task group (for the node's background tasks)."""
        if self._tg is None:
            raise RuntimeError("the orchestrator is not running (use `async with`)")
        return self._tg

    @property
    def accepting(self) -> bool:
        return self.sessions.accepting

    @accepting.setter
    def accepting(self, value: bool) -> None:
        self.sessions.accepting = value

    @property
    def running_turns(self) -> int:
        return self.sessions.running_turns

    async def drain(self, grace: float | None = None) -> None:
        """Stop admitting, let running turns finish for ``grace`` s, let go of every session.

        Sessions are checkpointed and evicted (closed with ``--durability
        none``). Turns still waiting or running when the grace is over
        answer 503 ``ServiceUnavailableError``; every sandbox is stopped.
        """
        await self.sessions.drain(self.config.shutdown_grace if grace is None else grace)

    async def shutdown(self, grace: float | None = None) -> None:
        """:meth:`drain`, then close every sandbox provider (warm pools)."""
        await self.drain(grace)
        for provider in list(self._providers.values()):
            with anyio.move_on_after(10):
                await provider.aclose()
        self._providers.clear()

    # -- templates ----------------------------------------------------------

    async def provider_for(self, template: Any) -> SandboxProvider:
        """The (opened) sandbox provider of a template, created on first use.

        Keyed by id *and* content digest: a template redeployed in place
        under an explicit id gets a fresh provider running the new code.
        """
        key = f"{template.id}@{template.digest}"
        provider = self._providers.get(key)
        if provider is not None:
            return provider
        lock = self._provider_locks.setdefault(key, anyio.Lock())
        async with lock:
            provider = self._providers.get(key)
            if provider is None:
                stale = [k for k in self._providers if k.startswith(f"{template.id}@")]
                for old in stale:
                    self.spawn(self._providers.pop(old).aclose)
                provider = self._make_provider(template)
                await provider.open()
                self._providers[key] = provider
                self._turn_timeouts[template.id] = float(template.spec.runtime.timeout)
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
                isolation=self.config.isolation,  # type: ignore[arg-type]
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
        """The tenant's own templates, then the shared ones."""
        own = await self.templates.list(tenant)
        if tenant == SHARED_TENANT:
            return list(own)
        return [*own, *await self.templates.list(SHARED_TENANT)]

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
            await self.drop_provider(template.id)
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

        Two tenants who uploaded the same content share its id (and files):
        one's delete leaves the other's template, sessions and sandboxes be.
        """
        async with anyio.create_task_group() as tg:
            for session in self.directory:
                if session.template_id == template.id and session.tenant == tenant:
                    tg.start_soon(self.close_session, session, "closed: its template was deleted")
        await self.templates.delete(template.id, tenant)
        if self.template_index is not None:
            await self.template_index.unpublish(template)
        self._templates_changed()
        if not any(t.id == template.id for t in await self.templates.list()):
            await self.drop_provider(template.id)

    async def drop_provider(self, template_id: str) -> None:
        for key in [k for k in self._providers if k.startswith(f"{template_id}@")]:
            await self._providers.pop(key).aclose()

    # -- the session host's provisioner --------------------------------------

    async def template_by_id(self, template_id: str, tenant: str = SHARED_TENANT) -> Any:
        try:
            return await self.templates.get(template_id)
        except TemplateNotFoundError:
            template = await self._fetch(template_id, tenant)
            if template is None:
                raise
            return template

    def turn_timeout(self, template_id: str) -> float:
        """The template's ``spec.runtime.timeout`` for each turn."""
        return self._turn_timeouts.get(template_id, 300.0)

    # -- sessions (see SessionHost) -----------------------------------------

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
        """Start a session of a deployed template; returns once its sandbox is ready."""
        return await self.sessions.create_session(
            tenant,
            template_id,
            session_id=session_id,
            timeout_seconds=timeout_seconds,
            env_vars=env_vars,
            metadata=metadata,
        )

    async def get_or_create_session(
        self, tenant: str, agent_id: str, session_id: str | None
    ) -> Session:
        """The AgentCore route: the session named by the caller, created on first use."""
        return await self.sessions.get_or_create_session(tenant, agent_id, session_id)

    async def open_session(self, tenant: str, session_id: str) -> Session:
        """A live session of the tenant (restored if dormant); 404 naming why it ended."""
        return await self.sessions.open_session(tenant, session_id)

    def get_session(self, tenant: str, session_id: str) -> Session:
        """A live session of the tenant held in memory; 404 naming why it ended."""
        return self.sessions.get_session(tenant, session_id)

    def list_sessions(self, tenant: str) -> list[Session]:
        return self.sessions.list_sessions(tenant)

    async def list_dormant(self, tenant: str) -> list[SessionRecord]:
        return await self.sessions.list_dormant(tenant)

    async def close_session(self, session: Session, reason: str = "closed by the caller") -> None:
        await self.sessions.close_session(session, reason)

    async def pause(self, session: Session) -> None:
        await self.sessions.pause(session)

    async def resume(self, session: Session) -> None:
        await self.sessions.resume(session)

    def set_timeout(self, session: Session, seconds: object) -> None:
        self.sessions.set_timeout(session, seconds)

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
        """Admit one invocation; the caller then waits on the returned turn (see SessionHost)."""
        return self.sessions.submit(
            session,
            payload,
            key=key,
            body_hash=body_hash,
            request_id=request_id,
            strategy=strategy,
            inline=inline,
        )

    async def run_inline(self, session: Session, turn: Turn) -> None:
        await self.sessions.run_inline(session, turn)

    def reader_left(self, session: Session, turn: Turn) -> None:
        self.sessions.reader_left(session, turn)

    async def durable(self, session: Session, turn: Turn) -> None:
        await self.sessions.durable(session, turn)

    def _check_accepting(self) -> None:
        self.sessions.check_accepting()
