"""The orchestrator: templates, sandbox providers, session actors and their lifetimes.

HTTP-free: the front end (``api.py``, ``hotpath.py``) calls these methods.
``async with Orchestrator(config) as host:`` owns one task group in which
every actor task, the expiry reaper and template builds run.
"""

from __future__ import annotations

import heapq
import itertools
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

from ppio_sandbox.agent_runtime.errors import (
    InvocationCancelledError,
    PPIOAgentRuntimeError,
    SandboxCrashedError,
    ServiceUnavailableError,
    SessionNotFoundError,
    TemplateNotFoundError,
    ValidationError,
)

from ._policy import SandboxPolicy
from ._validate import check_session_id, check_timeout_seconds
from .actor import Session, TurnRunner, notify
from .directory import InMemorySessionDirectory, SessionDirectory
from .sandbox.base import SandboxProvider
from .sandbox.inprocess import InProcessSandboxProvider
from .session_core import Admission, SessionCore, SessionLimits, Strategy, Turn, TurnOutcome

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


class _Reaper:
    """Closes sessions at their deadline: one task, one heap, lazy re-checks."""

    def __init__(self, host: Orchestrator) -> None:
        self.host = host
        self.heap: list[tuple[float, int, Session]] = []
        self.seq = itertools.count()
        self.wake = anyio.Event()
        self.next_at = float("inf")

    def track(self, session: Session) -> None:
        deadline = session.core.deadline()
        heapq.heappush(self.heap, (deadline, next(self.seq), session))
        if len(self.heap) > 2 * len(self.host.directory) + 1024:
            self._compact()
        if deadline < self.next_at:
            self.wake.set()

    def _compact(self) -> None:
        # Entries of closed sessions (and stale deadlines) are dropped lazily
        # when due; under churn they would pile up for a whole idle timeout.
        self.heap = [(s.core.deadline(), next(self.seq), s) for s in self.host.directory]
        heapq.heapify(self.heap)

    async def run(self) -> None:
        host = self.host
        while True:
            now = host.clock()
            while self.heap and self.heap[0][0] <= now:
                _, _, session = heapq.heappop(self.heap)
                core = session.core
                if core.ended:
                    continue
                reason = core.expiry_reason(now)
                if reason is not None:
                    host.spawn(host.close_session, session, reason)
                else:
                    heapq.heappush(self.heap, (core.deadline(), next(self.seq), session))
            self.next_at = self.heap[0][0] if self.heap else float("inf")
            self.wake = anyio.Event()
            with anyio.move_on_after(max(0.0, min(self.next_at - host.clock(), 3600.0))):
                await self.wake.wait()


class Orchestrator:
    """Hosts templates and sessions. See the module docstring."""

    def __init__(
        self,
        config: OrchestratorConfig | None = None,
        *,
        templates: Any = None,
        directory: SessionDirectory | None = None,
        metrics: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or OrchestratorConfig()
        self.clock = clock
        self.templates = templates
        self.directory = directory or InMemorySessionDirectory()
        self.metrics = metrics
        self.accepting = True
        self.running_turns = 0
        self._idle: anyio.Event | None = None  # set up only while draining
        self._providers: dict[str, SandboxProvider] = {}
        self._provider_locks: dict[str, anyio.Lock] = {}
        self._creating: dict[tuple[str, str], anyio.Event] = {}
        self._turn_timeouts: dict[str, float] = {}
        self._building: set[tuple[str, str]] = set()
        self._resolved: dict[tuple[str, str], Any] = {}
        self._template_generation = 0
        self.sandbox_policy = SandboxPolicy(trust_uploads=self.config.trust_uploads)
        self._runner = TurnRunner(self)
        self._reaper = _Reaper(self)
        self._tg: anyio.abc.TaskGroup | None = None

    # -- lifecycle ----------------------------------------------------------

    async def __aenter__(self) -> Orchestrator:
        if self.templates is None:
            from .templates import TemplateStore

            self.templates = TemplateStore(self.config.data_dir)
        await self.templates.open()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._reaper.run)
        if self.metrics is not None:
            self.metrics.bind(session_states=self._count_states, mailbox_depth=self._mailbox_depth)
        return self

    def _count_states(self) -> dict[str, float]:
        counts: dict[str, float] = {}
        for session in self.directory:
            state = session.core.state.value
            counts[state] = counts.get(state, 0) + 1
        return counts

    def _mailbox_depth(self) -> float:
        return float(sum(session.core.queued for session in self.directory))

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
            await self.templates.close()

    def spawn(self, func: Callable[..., Any], *args: Any) -> None:
        if self._tg is None:
            raise RuntimeError("the orchestrator is not running (use `async with`)")
        self._tg.start_soon(func, *args)

    async def drain(self, grace: float | None = None) -> None:
        """Stop admitting, let running turns finish for ``grace`` s, end every session.

        Turns still waiting or running when the grace is over answer 503
        ``ServiceUnavailableError``; every sandbox is stopped.
        """
        self.accepting = False
        grace = self.config.shutdown_grace if grace is None else grace
        if self.running_turns and grace > 0:
            logger.info("draining %d running turns (up to %.0f s)", self.running_turns, grace)
            self._idle = idle = anyio.Event()
            with anyio.move_on_after(grace):
                await idle.wait()
        async with anyio.create_task_group() as tg:
            for session in self.directory:
                tg.start_soon(
                    self.close_session,
                    session,
                    "closed: the orchestrator shut down",
                    ServiceUnavailableError,
                )

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
            template = await self.templates.resolve(agent_id, tenant)
        except TemplateNotFoundError:
            if tenant == SHARED_TENANT:
                raise
            template = await self.templates.resolve(agent_id, SHARED_TENANT)
        if template.phase == "deployed" and generation == self._template_generation:
            if len(self._resolved) >= 4096:
                self._resolved.clear()
            self._resolved[(tenant, agent_id)] = template
        return template

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
        """Close the template's sessions, stop its sandboxes, forget it."""
        async with anyio.create_task_group() as tg:
            for session in self.directory:
                if session.template_id == template.id:
                    tg.start_soon(self.close_session, session, "closed: its template was deleted")
        await self.drop_provider(template.id)
        await self.templates.delete(template.id, tenant)
        self._templates_changed()

    async def drop_provider(self, template_id: str) -> None:
        for key in [k for k in self._providers if k.startswith(f"{template_id}@")]:
            await self._providers.pop(key).aclose()

    # -- sessions -----------------------------------------------------------

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
        """Start a session of a deployed template; returns once its sandbox is ready.

        All or nothing: a session that cannot be fully set up is not in the
        directory and its sandbox is closed.
        """
        self._check_accepting()
        if timeout_seconds is not None:
            timeout_seconds = check_timeout_seconds(timeout_seconds)
        sid = check_session_id(session_id) if session_id else "sess-" + secrets.token_hex(8)
        template = await self.resolve_template(template_id, tenant)
        if template.phase != "deployed":
            raise TemplateNotFoundError(f"template {template.id} is {template.phase}, not deployed")
        key = (tenant, sid)
        if self.directory.get(tenant, sid) is not None or key in self._creating:
            raise ValidationError(f"session {sid} already exists")
        provider = await self.provider_for(template)
        now = self.clock()
        core = SessionCore(sid, now=now, limits=self.config.limits, timeout_seconds=timeout_seconds)
        session = Session(
            core, tenant=tenant, template_id=template.id, metadata=metadata, env_vars=env_vars
        )
        ready = self._creating[key] = anyio.Event()
        try:
            try:
                with anyio.fail_after(self.config.start_timeout):
                    session.sandbox = await provider.create(sid, env_vars)
            except ValueError as exc:  # e.g. env_vars the sandbox refuses
                raise ValidationError(str(exc)) from None
            except TimeoutError:
                raise ServiceUnavailableError(
                    f"sandbox for {template.id} did not start in {self.config.start_timeout:g} s"
                ) from None
            try:
                self._count_sandbox_start(provider.kind)
                core.started(self.clock())
                self.directory.add(session)
                self._reaper.track(session)
            except BaseException:
                self.directory.remove(tenant, sid, None)
                with anyio.CancelScope(shield=True):
                    await session.sandbox.close()
                raise
        finally:
            del self._creating[key]
            ready.set()
        return session

    async def get_or_create_session(
        self, tenant: str, agent_id: str, session_id: str | None
    ) -> Session:
        """The AgentCore route: the session named by the caller, created on first use."""
        if session_id:
            check_session_id(session_id)
            while (pending := self._creating.get((tenant, session_id))) is not None:
                await pending.wait()
            session = self.directory.get(tenant, session_id)
            if session is not None:
                session.core.check_alive()
                return session
            reason = self.directory.end_reason(tenant, session_id)
            if reason is not None:
                raise SessionNotFoundError(f"session {session_id} {reason}")
        return await self.create_session(tenant, agent_id, session_id=session_id)

    def get_session(self, tenant: str, session_id: str) -> Session:
        """A live session of the tenant; 404 naming why it ended otherwise."""
        session = self.directory.get(tenant, session_id)
        if session is None:
            reason = self.directory.end_reason(tenant, session_id)
            raise SessionNotFoundError(
                f"session {session_id} {reason}" if reason else f"session {session_id} not found"
            )
        session.core.check_alive()
        return session

    def list_sessions(self, tenant: str) -> list[Session]:
        return [s for s in self.directory if s.tenant == tenant]

    async def close_session(
        self,
        session: Session,
        reason: str = "closed by the caller",
        error: type[PPIOAgentRuntimeError] = SessionNotFoundError,
    ) -> None:
        """End a session: fail what waits, cancel what runs (with ``error``), stop the sandbox."""
        core = session.core
        if core.ended:
            return
        running = core.running
        for turn in core.begin_close(reason, self.clock(), error):
            notify(turn)
        if running is not None and running.stop_error is not None and running.cancel is not None:
            running.cancel()
        session.kick()
        self.directory.remove(session.tenant, session.session_id, reason)
        with anyio.CancelScope(shield=True):
            if session.sandbox is not None:
                await session.sandbox.close()
        core.closed()
        logger.info("session %s %s", session.session_id, reason)

    async def pause(self, session: Session) -> None:
        session.core.pause(self.clock())
        if session.sandbox is not None:
            await session.sandbox.pause()

    async def resume(self, session: Session) -> None:
        if session.sandbox is not None:
            await session.sandbox.resume()
        session.core.resume(self.clock())
        if session.core.queued:
            self.activate(session)

    def set_timeout(self, session: Session, seconds: object) -> None:
        session.core.set_timeout(check_timeout_seconds(seconds), self.clock())
        self._reaper.track(session)

    # -- turns --------------------------------------------------------------

    def submit(
        self,
        session: Session,
        payload: dict[str, Any],
        *,
        key: str,
        body_hash: bytes,
        request_id: str,
        strategy: Strategy = Strategy.ENQUEUE,
    ) -> tuple[Admission, Turn]:
        """Admit one invocation; the caller then waits on the returned turn."""
        self._check_accepting()
        now = self.clock()
        turn = Turn(key, body_hash, payload, request_id=request_id, submitted_at=now)
        core = session.core
        admission, turn, to_cancel = core.admit(turn, strategy, now)
        if to_cancel is not None and to_cancel.cancel is not None:
            error = InvocationCancelledError(f"interrupted by a newer turn (request {request_id})")
            if core.stop(to_cancel, error):
                to_cancel.cancel()
        if admission is Admission.QUEUED:
            self.activate(session)
        return admission, turn

    def activate(self, session: Session) -> None:
        """Make sure an actor task runs the session's mailbox."""
        if session.core.paused or session.kick():
            return
        session.active = True
        self.spawn(self._runner.run, session)

    def reader_left(self, session: Session, turn: Turn) -> None:
        """A stream's reader went away; cancel the turn unless one comes back."""
        turn.readers -= 1
        if turn.readers == 0 and not turn.done and turn.streaming:
            self.spawn(self._cancel_orphan, session, turn)

    async def _cancel_orphan(self, session: Session, turn: Turn) -> None:
        await anyio.sleep(self.config.stream_resume_grace)
        if turn.readers == 0 and not turn.done and turn.cancel is not None:
            error = InvocationCancelledError("the caller disconnected from the stream")
            if session.core.stop(turn, error):
                turn.cancel()

    def turn_timeout(self, session: Session) -> float:
        """The template's ``spec.runtime.timeout`` for each turn."""
        return self._turn_timeouts.get(session.template_id, 300.0)

    def turn_started(self) -> None:
        self.running_turns += 1

    def turn_finished(self, session: Session, turn: Turn, outcome: TurnOutcome) -> None:
        self.running_turns -= 1
        if self.running_turns == 0 and self._idle is not None:
            self._idle.set()
        if self.metrics is not None:
            duration = (turn.finished_at or 0.0) - (turn.started_at or 0.0)
            self.metrics.record_turn(outcome.value, duration)

    def crash_verdict(self, session: Session) -> tuple[bool, str | None]:
        """A sandbox died in a turn: ``(restart, None)``, or ``(False, why the session failed)``.

        Decided before the crashed turn's caller is answered, so a call made
        right after a fatal crash already hears that the session failed, and
        so does the caller of the turn whose crash spent the restart budget.
        """
        core = session.core
        kind = session.sandbox.kind if session.sandbox is not None else "unknown"
        if self.metrics is not None:
            self.metrics.sandbox_crashes_total.labels(kind).inc()
        if core.ended:
            return False, None
        if core.sandbox_crashed(self.clock()):
            return True, None
        reason = (
            f"failed: its sandbox crashed more than {core.limits.restart_budget} times "
            f"in {core.limits.restart_window:g} s"
        )
        for waiting in core.fail(reason, self.clock(), SandboxCrashedError):
            notify(waiting)
        self.directory.remove(session.tenant, session.session_id, reason)
        logger.warning("session %s %s", session.session_id, reason)
        return False, reason

    async def replace_sandbox(self, session: Session, restart: bool) -> None:
        """Stop a crashed sandbox and, if ``restart``, start a fresh one in its place."""
        if session.sandbox is not None:
            await session.sandbox.close()
        if not restart or session.core.ended:
            return
        logger.warning("session %s: sandbox crashed, restarting", session.session_id)
        try:
            template = await self.templates.get(session.template_id)
            provider = await self.provider_for(template)
            with anyio.fail_after(self.config.start_timeout):
                session.sandbox = await provider.create(session.session_id, session.env_vars)
            self._count_sandbox_start(provider.kind)
        except (PPIOAgentRuntimeError, TimeoutError, OSError) as exc:
            logger.warning("session %s: restart failed: %s", session.session_id, exc)
            session.sandbox = None  # the next turn fails fast and counts another crash

    def _count_sandbox_start(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.sandbox_starts_total.labels(kind).inc()

    def _check_accepting(self) -> None:
        if not self.accepting:
            raise ServiceUnavailableError("the orchestrator is shutting down")
