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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

from .actor import Session
from .checkpoints import Durability
from .directory import SessionDirectory
from .sandbox.base import SandboxProvider
from .session_core import Admission, SessionLimits, Strategy, Turn
from .session_host import Ownership, SessionHost
from .state_store import SessionRecord, SQLiteStateStore, StateStore
from .template_service import SHARED_TENANT, TemplateService

__all__ = ["SHARED_TENANT", "Orchestrator", "OrchestratorConfig"]


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
    sandbox_server: str = "auto"
    """The HTTP server of the runtime in process sandboxes: ``auto`` (uvicorn when
    installed and the agent runs on asyncio), ``hypercorn`` or ``uvicorn``
    (:func:`.sandbox._process_spawn.resolve_server`)."""


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
        self.template_service = TemplateService(
            config,
            templates,
            spawn=self.spawn,
            close_sessions=self._close_sessions_of,
            accepting=self.sessions.check_accepting,
        )
        self._tg: anyio.abc.TaskGroup | None = None

    # -- lifecycle ----------------------------------------------------------

    async def __aenter__(self) -> Orchestrator:
        if self.templates is None:
            from .templates import TemplateStore

            self.templates = self.template_service.templates = TemplateStore(self.config.data_dir)
        await self.templates.open()
        await self.sessions.store.open()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self.sessions.start(self._tg)
        if getattr(self.templates, "shared", False):
            self._tg.start_soon(self.template_service.follow_templates)
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
        await self.template_service.close_providers()

    # -- templates (see TemplateService) ------------------------------------

    @property
    def sandbox_policy(self) -> Any:
        return self.template_service.sandbox_policy

    @property
    def template_index(self) -> Any:
        return self.template_service.template_index

    @template_index.setter
    def template_index(self, index: Any) -> None:
        self.template_service.template_index = index

    async def provider_for(self, template: Any) -> SandboxProvider:
        return await self.template_service.provider_for(template)

    async def resolve_template(self, agent_id: str, tenant: str) -> Any:
        """The tenant's template by id or name, else a shared one (see TemplateService)."""
        return await self.template_service.resolve_template(agent_id, tenant)

    async def list_templates(self, tenant: str) -> list[Any]:
        return await self.template_service.list_templates(tenant)

    async def deploy_archive(self, data: bytes, tenant: str) -> Any:
        """Store an uploaded template and smoke-test it in the background."""
        return await self.template_service.deploy_archive(data, tenant)

    async def register_directory(self, path: Path, tenant: str) -> Any:
        """Register a local template directory (``serve --template``) and build it now."""
        return await self.template_service.register_directory(path, tenant)

    async def build_template(self, template: Any) -> None:
        await self.template_service.build_template(template)

    async def delete_template(self, template: Any, tenant: str) -> None:
        await self.template_service.delete_template(template, tenant)

    async def _close_sessions_of(self, template_id: str, tenant: str, reason: str) -> None:
        async with anyio.create_task_group() as tg:
            for session in self.directory:
                if session.template_id == template_id and session.tenant == tenant:
                    tg.start_soon(self.close_session, session, reason)

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

    # -- the session host's provisioner (the template service) --------------

    async def template_by_id(self, template_id: str, tenant: str) -> Any:
        return await self.template_service.template_by_id(template_id, tenant)

    def turn_timeout(self, template_id: str, tenant: str) -> float:
        return self.template_service.turn_timeout(template_id, tenant)
