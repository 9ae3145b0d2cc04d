"""``ProcessSandbox``: one session's agent in its own OS process, over HTTP.

Public through :mod:`.process`; see that module for the overview, and
:mod:`._isolation` for the walls around the process. The orchestrator
speaks HTTP/1.1 to the process through :class:`._h11client.H11Client`
(h11 over anyio streams, one or two keep-alive connections).

Every wait has a deadline: start (``start_timeout``), ``/ping``
(:data:`PING_TIMEOUT`; a paused sandbox answers ``{"status": "Paused"}``
without touching the process), close (``close_grace``, then SIGKILL and
bounded waits). A turn's read has none here: the session's actor owns the
turn deadline (a cancel scope), and a paused sandbox may sit mid-turn.

Errors carry the agent's log tail for the caller with the host paths it
may name (its working directory, the sandboxes' root) replaced by
placeholders such as ``<workdir>``; the orchestrator's log gets the tail
as it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.lowlevel

from ppio_sandbox.agent_runtime.errors import SandboxCrashedError, ServiceUnavailableError
from ppio_sandbox.agent_runtime.protocol import (
    CONTENT_JSON,
    CONTENT_SSE,
    HEADER_AGENTCORE_SESSION_ID,
    HEADER_REQUEST_ID,
    HEADER_SESSION_ID,
    encode_json,
)

from . import _isolation
from . import _process_spawn as _spawn
from ._h11client import H11Client, TransportError
from ._process_events import EventStream, decode_reply
from .base import Sandbox, TurnCall

__all__ = ["ProcessSandbox"]

logger = logging.getLogger("ppio_sandbox.orchestrator.sandbox")

_HOP_BY_HOP = frozenset(
    {"connection", "content-length", "content-type", "host", "keep-alive", "te", "trailer"}
    | {"transfer-encoding", "upgrade"}
)
_OWN_HEADERS = frozenset(
    h.lower() for h in (HEADER_SESSION_ID, HEADER_AGENTCORE_SESSION_ID, HEADER_REQUEST_ID)
)
_SSE = CONTENT_SSE.encode()
# The actor owns the turn's deadline (cancel scopes); the client only bounds
# connecting and writing (H11Client's defaults: 10 s, 60 s). No read timeout:
# a paused sandbox may sit mid-turn.
PING_TIMEOUT = 5.0
"""A live sandbox that does not answer ``/ping`` within this is reported unavailable."""
_PING_TIMEOUT: Any = PING_TIMEOUT  # seconds; a test may patch in an httpx.Timeout (its .read)
_GONE_TIMEOUT = 5.0  # after SIGKILL: for the last processes of the sandbox to be reaped
_ACCEPT = f"{CONTENT_JSON}, {CONTENT_SSE}"


class ProcessSandbox(Sandbox):
    """One session's agent in its own OS process.

    ``template_dir`` is copied into a fresh directory under ``work_root``;
    the process is ``python -m ppio_sandbox.agent_runtime <entrypoint>`` or,
    when given, ``command`` (which then wins over ``entrypoint``). ``env``
    is the template's environment, ``env_vars`` the session's (see
    :func:`._process_spawn.sandbox_environment`); ``memory_limit`` (bytes),
    ``cpu_limit`` (cores) and ``pids_limit`` are enforced, and
    ``isolation``, ``network``, ``uid_range`` and ``read_only_paths`` chose
    the walls, as :class:`._process_spawn.ProcessSpec` describes.
    ``bind="tcp"`` serves on ``127.0.0.1:<free port>`` instead of a Unix
    socket, for command sandboxes that cannot do otherwise (that needs the
    host's network: no network namespace then).

    ``start()`` = :meth:`launch` (copy, spawn; a few ms) + waiting for
    ``/ping``. ``close()`` stops the process group and removes the files.
    ``TurnCall.state`` is not used: ``context.state`` lives in the agent
    process (keyed by session id) for as long as the process does.

    With namespaces, :attr:`pid` is bwrap's (the orchestrator's child); the
    agent is pid 2 of its own PID namespace, in the session bwrap's init
    starts there: that process group is what pause (without a freezer) and
    close signal.
    """

    kind = "process"

    def __init__(
        self,
        template_dir: Path,
        entrypoint: str | None = None,
        *,
        command: Sequence[str] | None = None,
        work_root: Path,
        session_id: str | None = None,
        env_vars: Mapping[str, str] | None = None,
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
        spec = _spawn.ProcessSpec(
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
            server=_spawn.resolve_server(server, python),
        )
        self._setup(spec, session_id, env_vars)

    @classmethod
    def from_spec(
        cls,
        spec: _spawn.ProcessSpec,
        session_id: str | None = None,
        env_vars: Mapping[str, str] | None = None,
    ) -> ProcessSandbox:
        """A sandbox of a template whose settings a provider already checked."""
        self = cls.__new__(cls)
        self._setup(spec, session_id, env_vars)
        return self

    def _setup(
        self, spec: _spawn.ProcessSpec, session_id: str | None, env_vars: Mapping[str, str] | None
    ) -> None:
        _spawn.check_env(env_vars or {}, "env_vars")
        self.spec = spec
        self.session_id = session_id
        self._env_vars = dict(env_vars or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: H11Client | None = None
        self._launch: _spawn.Launch | None = None
        self._address = ""
        self._deadline = 0.0
        self._lock = anyio.Lock()
        self._started = self._broken = self._closing = self._paused = False
        self._paused_at = 0.0
        self._closed = anyio.Event()
        self._started_at: float | None = None
        # Inside bwrap: the namespace's init and the agent's process group (host ids).
        self._inner: tuple[int | None, int | None] = (None, None)

    # --- facts ---------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """True from a successful start until death, a broken connection or close."""
        proc = self._proc
        return (
            self._started
            and not self._broken
            and not self._closing
            and proc is not None
            and proc.poll() is None  # waitpid(WNOHANG): also reaps a dead child
        )

    @property
    def pid(self) -> int | None:
        """The process id (also its process group id), once launched: bwrap's, if wrapped."""
        return self._proc.pid if self._proc is not None else None

    @property
    def workdir(self) -> Path | None:
        """The sandbox's own directory (its cwd and HOME), once launched."""
        return self._launch.workdir if self._launch is not None else None

    @property
    def uid(self) -> int | None:
        """The uid the agent runs as when it has one of its own."""
        launch = self._launch
        return launch.uid.uid if launch is not None and launch.uid is not None else None

    @property
    def cgroup(self) -> _isolation.SandboxCgroup | None:
        """The sandbox's cgroup, when the host offers one."""
        return self._launch.cgroup if self._launch is not None else None

    @property
    def log_path(self) -> Path | None:
        """Where the process's stdout and stderr go."""
        workdir = self.workdir
        return workdir / _spawn.PRIVATE_DIR / _spawn.LOG_NAME if workdir else None

    @property
    def _wrapped(self) -> bool:
        return self._launch is not None and self._launch.plan.level == "bwrap"

    def describe(self) -> dict[str, Any]:
        """Pid, address, workdir, walls and state, for the session's API view."""
        launch = self._launch
        return {
            "kind": self.kind,
            "pid": self.pid,
            "socket": str(launch.socket) if launch else None,
            "address": self._address or None,
            "workdir": str(launch.workdir) if launch else None,
            "session_id": self.session_id,
            "alive": self.alive,
            "paused": self._paused,
            "started_at": self._started_at,
            "isolation": {**launch.plan.describe(), "uid": self.uid} if launch else None,
        }

    async def log_tail(self, size: int = 4096) -> str:
        """The last ``size`` bytes of the process's stdout and stderr."""
        launch = self._launch
        if launch is None:
            return ""
        return await anyio.to_thread.run_sync(_spawn.read_tail, launch.log_fd, size)

    def scrub(self, text: str) -> str:
        """``text`` without the host paths a caller has no business seeing."""
        launch = self._launch
        if launch is None:
            return text
        return _spawn.scrub_paths(
            text,
            {
                launch.workdir: "<workdir>",
                launch.extra_dir: "<socket-dir>",
                self.spec.work_root: "<sandboxes>",
                self.spec.work_root.parent: "<data>",
            },
        )

    # --- lifecycle -----------------------------------------------------------------------

    async def launch(self) -> None:
        """Copy the template and spawn the process, without waiting for it. Idempotent.

        A warm pool launches ahead of need; :meth:`start` then only waits
        for ``/ping`` (``start_timeout`` counts from the launch). Raises
        SandboxCrashedError if the program cannot be executed.
        """
        async with self._lock:
            await self._launch_locked()

    async def start(self) -> None:
        """Launch if needed and wait for ``/ping``; SandboxCrashedError if that fails.

        Fails as soon as the process exits (with its exit status and log
        tail), or at ``start_timeout``. On failure or cancellation the
        process and its files are gone before this returns. Idempotent.
        """
        async with self._lock:
            if self._started:
                return
            await self._launch_locked()
            try:
                await self._wait_ready()
            except BaseException:
                await self.close()
                raise
            self._started = True
            self._started_at = time.time()

    async def _launch_locked(self) -> None:
        if self._closing:
            raise SandboxCrashedError("sandbox is closed")
        if self._proc is not None:
            return
        try:
            await self._spawn()
        except BaseException:
            await self.close()
            raise

    async def _spawn(self) -> None:
        # One shielded thread hop for all the blocking work: a cancellation
        # arriving meanwhile must not lose its result (a directory, a uid, a
        # process) before we own it; what it made is on ``self`` for close().
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._prepare_and_spawn)
        self._deadline = anyio.current_time() + self.spec.start_timeout
        await anyio.lowlevel.checkpoint()  # deliver a cancellation that waited

    def _prepare_and_spawn(self) -> None:
        """Copy, lease, create the cgroup, make the client, spawn (in a worker thread)."""
        spec = self.spec
        try:
            launch = self._launch = _spawn.prepare_launch(spec, self.session_id or "warm")
        except _isolation.IsolationUnavailable as exc:
            raise SandboxCrashedError(str(exc)) from exc
        except (OSError, RuntimeError) as exc:  # no uid left, a cgroup refused...
            raise SandboxCrashedError(f"could not prepare the sandbox: {exc}") from exc
        if spec.bind == "tcp":
            port = _spawn.free_tcp_port()
            self._address = f"127.0.0.1:{port}"
            client = H11Client.tcp("127.0.0.1", port)
        else:
            self._address = f"unix:{launch.socket}"
            client = H11Client.unix(launch.socket)
        env = _spawn.sandbox_environment(
            spec,
            workdir=launch.workdir,
            bind=self._address,
            session_id=self.session_id,
            env_vars=self._env_vars,
        )
        if spec.command is not None:
            argv = list(spec.command)
        else:
            assert spec.entrypoint is not None
            argv = [spec.python, "-m", "ppio_sandbox.agent_runtime", spec.entrypoint]
            argv += ["--bind", self._address]
            if spec.server != "hypercorn":  # the runtime's default
                argv += ["--server", spec.server]
        self._client = client
        try:
            self._proc = _spawn.spawn(spec, launch, argv, env)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            raise SandboxCrashedError(f"could not start {argv[0]!r}: {exc}") from exc

    async def _wait_ready(self) -> None:
        proc, client, launch = self._proc, self._client, self._launch
        assert proc is not None
        assert client is not None
        assert launch is not None
        delay = 0.002
        while True:
            returncode = proc.poll()
            if returncode is not None:
                what = _spawn.describe_exit(returncode, wrapped=self._wrapped)
                raise await self._failure(
                    f"sandbox process {proc.pid} {what} before it was ready", returncode
                )
            # Skip HTTP while the socket does not exist yet: the common case.
            if self.spec.bind == "tcp" or launch.socket.exists():
                with anyio.move_on_after(max(0.1, self._deadline - anyio.current_time())):
                    try:
                        if (await client.request("GET", "/ping"))[0] == 200:
                            return
                    except TransportError:
                        pass
            if anyio.current_time() >= self._deadline:
                raise await self._failure(
                    f"sandbox process {proc.pid} did not answer /ping within "
                    f"{self.spec.start_timeout:g} s",
                    None,
                )
            await anyio.sleep(delay)
            delay = min(delay * 1.5, 0.05)

    async def _failure(self, message: str, returncode: int | None) -> SandboxCrashedError:
        """The error for a sandbox that failed: why, and its log tail without host paths."""
        cgroup = self.cgroup
        limit = self.spec.memory_limit
        if cgroup is not None and limit and await anyio.to_thread.run_sync(cgroup.oom_kills):
            message += (
                f" (out of memory: the sandbox used its whole memory_limit of {limit} bytes "
                "and the kernel killed it)"
            )
        tail = await self.log_tail()
        details: dict[str, Any] = {"pid": self.pid, "exit_code": returncode}
        if tail.strip():
            logger.warning("%s (session %s)\n--- log tail ---\n%s", message, self.session_id, tail)
            text = f"{message}\n--- log tail ---\n{self.scrub(tail)}"
        else:
            text = message
        return SandboxCrashedError(self.scrub(text), details=details)

    async def _crashed(self, cause: BaseException) -> SandboxCrashedError:
        """Turn a broken connection into SandboxCrashedError; the sandbox is dead now."""
        self._broken = True
        proc = self._proc
        if self._closing or proc is None:
            return SandboxCrashedError("sandbox was closed during the turn")
        # The socket closes as the process exits; give the kernel a moment to finish.
        returncode = await wait_exit(proc, 0.5)
        if returncode is None:
            what = f"dropped the connection ({type(cause).__name__}: {cause}) but is running"
        else:
            what = _spawn.describe_exit(returncode, wrapped=self._wrapped)
        return await self._failure(f"sandbox process {proc.pid} {what}", returncode)

    async def _agent_group(self) -> int | None:
        """The process group to signal: the agent's (inside bwrap), else the process's."""
        proc = self._proc
        if proc is None:
            return None
        if not self._wrapped:
            return proc.pid
        if self._inner[1] is None:
            cgroup = self.cgroup
            candidates = await anyio.to_thread.run_sync(cgroup.pids) if cgroup else None
            self._inner = await anyio.to_thread.run_sync(
                _isolation.agent_process, proc.pid, candidates
            )
        return self._inner[1]

    async def _signal(self, sig: signal.Signals) -> None:
        group = await self._agent_group()
        if group is not None:
            _spawn.signal_group(group, sig)

    async def pause(self) -> None:
        """Freeze the sandbox's cgroup, else SIGSTOP the agent's process group. Idempotent."""
        if self._proc is not None and not self._closing and not self._paused:
            cgroup = self.cgroup
            if cgroup is not None and cgroup.plan.freezer is not None:
                await anyio.to_thread.run_sync(cgroup.freeze, True)
            else:
                await self._signal(signal.SIGSTOP)
            self._paused = True
            self._paused_at = time.time()

    async def resume(self) -> None:
        """Undo :meth:`pause`. Idempotent."""
        if self._proc is not None and self._paused and not self._closing:
            await self._thaw()
            self._paused = False

    async def _thaw(self) -> None:
        cgroup = self.cgroup
        if cgroup is not None and cgroup.plan.freezer is not None:
            await anyio.to_thread.run_sync(cgroup.freeze, False)
        else:
            await self._signal(signal.SIGCONT)

    async def close(self) -> None:
        """Stop the sandbox's processes, reap them, give back its resources. Idempotent.

        Never raises; shielded from cancellation: the HTTP client is closed,
        then the sandbox is thawed (a stopped process cannot act on SIGTERM)
        and SIGTERM goes to the agent's process group; after up to
        ``close_grace`` seconds for the runtime to drain, SIGKILL goes to
        every process of the sandbox (its cgroup, the agent's group, bwrap:
        its namespace dies with it), the process is reaped and the sandbox's
        last processes are waited for (bounded); then its cgroup, uid,
        workdir and socket are given back. Concurrent callers wait for the
        first one to finish.
        """
        with anyio.CancelScope(shield=True):
            if self._closing:
                await self._closed.wait()
                return
            self._closing = True
            try:
                await self._close_now()
            except Exception:  # close never raises; the log keeps the reason
                logger.exception("closing process sandbox %s failed", self.pid)
            finally:
                self._closed.set()

    async def _close_now(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        proc, launch = self._proc, self._launch
        if proc is not None:
            if proc.poll() is None:
                if self._paused:
                    await self._thaw()
                group = await self._agent_group()
                if group is not None:  # else the agent has not started: nothing to drain
                    _spawn.signal_group(group, signal.SIGCONT)
                    _spawn.signal_group(group, signal.SIGTERM)
                    await wait_exit(proc, self.spec.close_grace)
            await self._kill_all(proc)
            if await wait_exit(proc, 10.0) is None:
                logger.error("sandbox process %s did not die after SIGKILL", proc.pid)
        self._paused = False
        if launch is not None:
            if self._wrapped and launch.cgroup is None and self._inner[0] is not None:
                # No cgroup to watch: wait for the namespace's init (the kernel
                # kills the rest of the namespace before it goes).
                await wait_gone(self._inner[0], _GONE_TIMEOUT)
            await anyio.to_thread.run_sync(_spawn.release_launch, launch, _GONE_TIMEOUT)

    async def _kill_all(self, proc: subprocess.Popen[bytes]) -> None:
        cgroup = self.cgroup
        if self._wrapped and self._inner[0] is None:
            await self._agent_group()  # learn the namespace's init before bwrap goes
        if cgroup is not None:
            await anyio.to_thread.run_sync(cgroup.kill_all)
        init, group = self._inner
        if group is not None:
            _spawn.signal_group(group, signal.SIGKILL)
        if init is not None:
            # Should bwrap die before its child set its parent-death signal, the
            # namespace would outlive it: its init takes SIGKILL from outside.
            with contextlib.suppress(ProcessLookupError):
                os.kill(init, signal.SIGKILL)
        _spawn.signal_group(proc.pid, signal.SIGKILL)

    # --- turns ---------------------------------------------------------------------------

    def _live_client(self) -> H11Client:
        if self._closing:
            raise SandboxCrashedError("sandbox is closed")
        if self._broken:
            raise SandboxCrashedError("sandbox crashed earlier")
        if self._client is None or not self._started:
            raise SandboxCrashedError("sandbox is not started")
        return self._client

    async def invoke(self, call: TurnCall) -> Any:
        """POST ``/invocations``: the result, or an async iterator of chunks (SSE).

        The iterator must be exhausted or closed (``aclose()``); closing it
        closes the connection, which cancels the agent's generator. Errors:
        the agent's error class (from its envelope), or SandboxCrashedError
        when the connection breaks (``alive`` is False from then on).
        """
        client = self._live_client()
        headers = {
            name: value
            for name, value in call.headers.items()
            if name.lower() not in _HOP_BY_HOP and name.lower() not in _OWN_HEADERS
        }
        headers[HEADER_SESSION_ID] = headers[HEADER_AGENTCORE_SESSION_ID] = call.session_id
        headers[HEADER_REQUEST_ID] = call.request_id
        headers["content-type"] = CONTENT_JSON
        headers["accept"] = _ACCEPT
        if call.traceparent is not None:  # the turn's span: the agent's RequestContext.traceparent
            headers["traceparent"] = call.traceparent
        try:
            # Cancelled or failed anywhere, the client closes the connection.
            response = await client.send(
                "POST", "/invocations", headers.items(), encode_json(call.payload)
            )
            status = response.status
            if status == 200 and response.header(b"content-type").startswith(_SSE):
                return EventStream(response, self._crashed)  # the stream owns the response
            body = await response.read()
        except TransportError as exc:
            raise await self._crashed(exc) from exc
        return decode_reply(status, body)

    async def ping(self) -> dict[str, Any]:
        """The agent's ``/ping`` body; ``{"status": "Paused", ...}`` at once when paused.

        SandboxCrashedError if the agent cannot be reached;
        ServiceUnavailableError if it does not answer within
        :data:`PING_TIMEOUT` (the sandbox is not declared dead for that).
        """
        client = self._live_client()
        if self._paused:
            return {"status": "Paused", "time_of_last_update": int(self._paused_at)}
        timeout = float(getattr(_PING_TIMEOUT, "read", _PING_TIMEOUT))
        try:
            with anyio.fail_after(timeout):
                status, body = await client.request("GET", "/ping")
        except TimeoutError as exc:  # the deadline, or connecting took too long
            raise ServiceUnavailableError(
                f"sandbox did not answer /ping within {timeout:g} s"
            ) from exc
        except TransportError as exc:
            raise await self._crashed(exc) from exc
        answer = decode_reply(status, body, envelope=False)
        return answer if isinstance(answer, dict) else {"status": answer}


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """Poll (``waitpid`` WNOHANG, never blocking) until the process is reaped."""
    deadline = anyio.current_time() + timeout
    delay = 0.001
    while (returncode := proc.poll()) is None:
        remaining = deadline - anyio.current_time()
        if remaining <= 0:
            return None
        await anyio.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.05)
    return returncode


async def wait_gone(pid: int, timeout: float) -> bool:
    """Poll until no process ``pid`` exists (not our child: no reaping here)."""
    deadline = anyio.current_time() + timeout
    delay = 0.001
    while await anyio.Path(f"/proc/{pid}").exists():
        remaining = deadline - anyio.current_time()
        if remaining <= 0:
            logger.error("sandbox process %s did not go away", pid)
            return False
        await anyio.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.05)
    return True
