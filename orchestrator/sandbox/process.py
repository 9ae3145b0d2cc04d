"""Process sandboxes: one OS process per session, spoken to over HTTP.

The process runs the agent runtime contract (DESIGN §3) on a Unix socket in
its own working directory; see :mod:`._process_spawn` for its
directory, environment and limits. Two ways to start it:

* ``entrypoint="agent.py"``: ``python -m ppio_sandbox.agent_runtime
  agent.py --bind unix:<sock>`` serves the file's ``PPIOAgentRuntimeApp``.
* ``command=[...]``: any program that serves the contract by itself, e.g.
  ``["python", "agent.py"]`` with a bedrock-agentcore ``BedrockAgentCoreApp``
  calling ``app.run()``. It finds its address in ``PPIO_AGENT_BIND``
  (``unix:/path``, or ``127.0.0.1:<port>`` with ``bind="tcp"``, then also in
  ``PORT``). ``BedrockAgentCoreApp.run(port=8080, host=None, **kw)`` reads
  no environment variable and binds TCP 8080 unless the agent passes
  ``port=`` or ``uds=``, so command sandboxes put a ``sitecustomize`` on
  the child's path that makes ``uvicorn.run`` listen on ``PPIO_AGENT_BIND``
  (Unix socket by default). Programs that are not uvicorn-based must read
  ``PPIO_AGENT_BIND`` or ``PORT`` themselves; use ``bind="tcp"`` for those
  that cannot listen on a Unix socket (the sandbox then talks TCP on
  loopback, reachable by any local user, unlike the 0700 socket).

Peers that are not this runtime answer a bare JSON value instead of the
``{"result", "status", ...}`` envelope (AgentCore does), end an SSE stream
without ``event: done``, and report a streaming failure as an ordinary data
chunk: a reply that is not shaped like the envelope is the result itself, a
stream that ends cleanly is complete, and such error chunks are passed on.

Walls (:mod:`._isolation`, docs/sandboxing.md): by default
(``isolation="auto"``) each sandbox runs under bubblewrap in its own mount,
PID, IPC, UTS and network namespaces (``network=True`` shares the host's
network), sees a read-only minimum of the host plus its own working
directory, runs as a uid of its own, and is limited by a cgroup of its own
(memory, CPU quota, process count, freezer for pause). Where the host lacks
a wall the provider falls back (RLIMITs, CPU affinity, SIGSTOP) and logs
one WARNING naming each missing wall; ``isolation="bwrap"`` refuses to run
without namespaces, ``isolation="none"`` builds no wall at all.

Orphans: ``close()`` (and the provider's ``aclose()``) end every process
they started, and a sandbox dies with its orchestrator even when that is
SIGKILLed: one long-lived thread forks every sandbox with
``PR_SET_PDEATHSIG`` (see :mod:`._process_spawn`), and bwrap's
``--die-with-parent`` takes the namespace down with bwrap.

Example::

    provider = ProcessSandboxProvider(Path("my_agent"), "agent.py",
                                      work_root=Path("/var/lib/ppio/work"), warm_pool=2)
    async with provider:
        sandbox = await provider.create("session-1")
        try:
            call = TurnCall({"prompt": "hi"}, session_id="session-1",
                            request_id="r1", state={})
            print(await sandbox.invoke(call))
        finally:
            await sandbox.close()
"""

from __future__ import annotations

import collections
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import anyio

from ppio_sandbox.agent_runtime.errors import SandboxCrashedError, ServiceUnavailableError

from . import _isolation
from ._process_sandbox import ProcessSandbox
from ._process_spawn import ProcessSpec, resolve_server
from .base import Sandbox, SandboxProvider

__all__ = ["ProcessSandbox", "ProcessSandboxProvider", "ProcessSpec"]

logger = logging.getLogger("ppio_sandbox.orchestrator.sandbox")


class ProcessSandboxProvider(SandboxProvider):
    """Creates a template's process sandboxes and keeps ``warm_pool`` of them launched.

    Arguments as for :class:`ProcessSandbox`, plus ``warm_pool``.

    :meth:`open` detects the host's walls (once per process) and logs the
    missing ones; with ``isolation="bwrap"`` on a host without bwrap it
    raises SandboxCrashedError instead of starting anything.

    The pool needs no background task, so :meth:`open`, :meth:`create` and
    :meth:`aclose` may be called from any task. :meth:`open` *launches*
    ``warm_pool`` processes (copy + spawn, a few ms each) and returns; they
    import and start listening on their own. :meth:`create` takes the oldest
    pooled process, confirms it with ``/ping`` (usually one round trip: it
    has long been ready), and launches its replacement concurrently. A
    pooled process that died or never became ready is closed and the next
    one tried; an empty pool means a cold start in the caller's task.

    A session with ``env_vars`` always gets a cold start: a warm process was
    started before its session existed, so neither the session's env vars
    nor ``PPIO_SESSION_ID`` are in its environment (the session id still
    reaches the agent with every request).
    """

    kind = "process"

    def __init__(
        self,
        template_dir: Path,
        entrypoint: str | None = None,
        *,
        command: Sequence[str] | None = None,
        work_root: Path,
        warm_pool: int = 0,
        env: Mapping[str, str] | None = None,
        memory_limit: int | None = None,
        cpu_limit: float | None = None,
        start_timeout: float = 20.0,
        python: str = sys.executable,
        bind: Literal["unix", "tcp"] = "unix",
        close_grace: float = 3.0,
        isolation: _isolation.Level = "auto",
        network: bool = False,
        pids_limit: int | None = _isolation.DEFAULT_PIDS_LIMIT,
        uid_range: tuple[int, int] = _isolation.DEFAULT_UID_RANGE,
        read_only_paths: Sequence[Path] = (),
        server: str = "auto",
    ) -> None:
        if warm_pool < 0:
            raise ValueError("warm_pool must be >= 0")
        self.spec = ProcessSpec(
            template_dir=Path(template_dir),
            work_root=Path(work_root),
            entrypoint=entrypoint,
            command=tuple(command) if command is not None else None,
            env=dict(env or {}),
            memory_limit=memory_limit,
            cpu_limit=cpu_limit,
            start_timeout=start_timeout,
            python=python,
            bind=bind,
            close_grace=close_grace,
            isolation=isolation,
            network=network,
            pids_limit=pids_limit,
            uid_range=uid_range,
            read_only_paths=tuple(Path(p) for p in read_only_paths),
            server=resolve_server(server, python),
        )
        self.warm_pool = warm_pool
        self.plan: _isolation.Plan | None = None
        """The walls this template's sandboxes get, once :meth:`open` has run."""
        self.last_error: str | None = None
        """The last reason a warm process failed, for the template's status."""
        self._pool: collections.deque[ProcessSandbox] = collections.deque()
        self._launching = 0
        self._opened = self._closed = False

    @property
    def pooled(self) -> list[ProcessSandbox]:
        """The launched sandboxes waiting for a session, oldest first."""
        return list(self._pool)

    def describe(self) -> dict[str, Any]:
        """Pool facts for the template's API view and metrics."""
        return {
            "kind": self.kind,
            "warm_pool": self.warm_pool,
            "pooled": len(self._pool),
            "launching": self._launching,
            "pids": [sandbox.pid for sandbox in self._pool],
            "last_error": self.last_error,
            "isolation": self.plan.describe() if self.plan is not None else None,
            "server": None if self.spec.command is not None else self.spec.server,
        }

    async def __aenter__(self) -> ProcessSandboxProvider:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Launch the warm pool (without waiting for the processes to be ready)."""
        if self._closed:
            raise ServiceUnavailableError("sandbox provider is closed")
        if not self._opened:
            await self._make_plan()
            self._opened = True
            await self._refill()

    async def _make_plan(self) -> None:
        spec = self.spec
        try:
            self.plan = await anyio.to_thread.run_sync(
                lambda: _isolation.make_plan(
                    spec.isolation,
                    network=spec.network,
                    bind=spec.bind,
                    memory_limit=spec.memory_limit,
                    cpu_limit=spec.cpu_limit,
                    pids_limit=spec.pids_limit,
                )
            )
        except _isolation.IsolationUnavailable as exc:
            self.last_error = str(exc)
            raise SandboxCrashedError(str(exc)) from exc

    async def create(self, session_id: str, env_vars: dict[str, str] | None = None) -> Sandbox:
        """A started sandbox for ``session_id``: from the warm pool when possible."""
        if self._closed:
            raise ServiceUnavailableError("sandbox provider is closed")
        if not env_vars:
            while self._pool:
                sandbox = self._pool.popleft()
                failure: SandboxCrashedError | None = None
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._refill)
                    try:
                        await sandbox.start()  # closes the sandbox if it fails
                    except SandboxCrashedError as exc:
                        failure = exc
                if failure is None:
                    sandbox.session_id = session_id
                    return sandbox
                self.last_error = str(failure)
                logger.warning("warm sandbox %s was not usable: %s", sandbox.pid, failure)
        sandbox = ProcessSandbox.from_spec(self.spec, session_id, env_vars)
        await sandbox.start()
        return sandbox

    async def aclose(self) -> None:
        """Close every pooled sandbox; later launches close themselves. Idempotent.

        Sandboxes already handed to sessions belong to them and are not
        touched.
        """
        self._closed = True
        with anyio.CancelScope(shield=True):
            pool = list(self._pool)
            self._pool.clear()
            async with anyio.create_task_group() as tg:
                for sandbox in pool:
                    tg.start_soon(sandbox.close)

    async def _refill(self) -> None:
        """Launch processes until the pool (with launches under way) is full."""
        missing = self.warm_pool - len(self._pool) - self._launching
        if missing <= 0 or self._closed or not self._opened:
            return
        self._launching += missing
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(missing):
                    tg.start_soon(self._launch_one)
        finally:
            self._launching -= missing

    async def _launch_one(self) -> None:
        sandbox = ProcessSandbox.from_spec(self.spec)
        try:
            await sandbox.launch()  # closes the sandbox if it fails
        except Exception as exc:  # a launch failure must not fail the caller's create()
            self.last_error = f"{type(exc).__name__}: {exc}"
            logger.warning("could not launch a warm sandbox: %s", self.last_error)
            return
        if self._closed:
            await sandbox.close()
        else:
            self._pool.append(sandbox)
