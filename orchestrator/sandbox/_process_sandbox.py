"""``ProcessSandbox``: one session's agent in its own OS process, over HTTP.

Public through :mod:`.process`; see that module for the overview.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.lowlevel
import httpx

from ppio_sandbox.agent_runtime.errors import SandboxCrashedError
from ppio_sandbox.agent_runtime.protocol import (
    CONTENT_JSON,
    CONTENT_SSE,
    HEADER_AGENTCORE_SESSION_ID,
    HEADER_REQUEST_ID,
    HEADER_SESSION_ID,
    encode_json,
)

from . import _process_spawn as _spawn
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
# The actor owns the turn's deadline (cancel scopes); the client only bounds
# connecting and writing. No read timeout: a paused sandbox may sit mid-turn.
_TIMEOUT = httpx.Timeout(connect=10.0, read=None, write=60.0, pool=None)
_LIMITS = httpx.Limits(max_keepalive_connections=4, keepalive_expiry=None)
# Plain HTTP to a local socket: TLS is never used, and ``verify=False`` spares
# each sandbox the ~25 ms of loading the CA bundle into a new SSL context.


class ProcessSandbox(Sandbox):
    """One session's agent in its own OS process.

    ``template_dir`` is copied into a fresh directory under ``work_root``;
    the process is ``python -m ppio_sandbox.agent_runtime <entrypoint>`` or,
    when given, ``command`` (which then wins over ``entrypoint``). ``env``
    is the template's environment, ``env_vars`` the session's (see
    :func:`._process_spawn.sandbox_environment`); ``memory_limit`` (bytes)
    and ``cpu_limit`` (cores) are enforced as :class:`._process_spawn.ProcessSpec`
    describes. ``bind="tcp"`` serves on ``127.0.0.1:<free port>`` instead of
    a Unix socket, for command sandboxes that cannot do otherwise.

    ``start()`` = :meth:`launch` (copy, spawn; a few ms) + waiting for
    ``/ping``. ``close()`` stops the process group and removes the files.
    ``TurnCall.state`` is not used: ``context.state`` lives in the agent
    process (keyed by session id) for as long as the process does.
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
        self._client: httpx.AsyncClient | None = None
        self._workdir: Path | None = None
        self._socket: Path | None = None
        self._extra_dir: Path | None = None
        self._address = ""
        self._deadline = 0.0
        self._lock = anyio.Lock()
        self._started = self._broken = self._closing = self._paused = False
        self._closed = anyio.Event()
        self._started_at: float | None = None

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
        """The process id (also its process group id), once launched."""
        return self._proc.pid if self._proc is not None else None

    @property
    def workdir(self) -> Path | None:
        """The sandbox's own directory (its cwd and HOME), once launched."""
        return self._workdir

    @property
    def log_path(self) -> Path | None:
        """Where the process's stdout and stderr go."""
        return self._workdir / _spawn.PRIVATE_DIR / _spawn.LOG_NAME if self._workdir else None

    def describe(self) -> dict[str, Any]:
        """Pid, address, workdir and state, for the session's API view."""
        return {
            "kind": self.kind,
            "pid": self.pid,
            "socket": str(self._socket) if self._socket else None,
            "address": self._address or None,
            "workdir": str(self._workdir) if self._workdir else None,
            "session_id": self.session_id,
            "alive": self.alive,
            "paused": self._paused,
            "started_at": self._started_at,
        }

    async def log_tail(self, size: int = 4096) -> str:
        """The last ``size`` bytes of the process's stdout and stderr."""
        path = self.log_path
        return await anyio.to_thread.run_sync(_spawn.read_tail, path, size) if path else ""

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
        spec = self.spec
        # Shielded thread hops: a cancellation arriving while the thread runs
        # must not lose its result (a directory, a process) before we own it.
        with anyio.CancelScope(shield=True):
            workdir, self._socket, self._extra_dir = await anyio.to_thread.run_sync(
                _spawn.prepare_workdir, spec, self.session_id or "warm"
            )
        self._workdir = workdir
        if spec.bind == "tcp":
            self._address = f"127.0.0.1:{_spawn.free_tcp_port()}"
            transport = httpx.AsyncHTTPTransport(limits=_LIMITS, verify=False)
            base_url = f"http://{self._address}"
        else:
            self._address = f"unix:{self._socket}"
            transport = httpx.AsyncHTTPTransport(
                uds=str(self._socket), limits=_LIMITS, verify=False
            )
            base_url = "http://sandbox"
        env = _spawn.sandbox_environment(
            spec,
            workdir=workdir,
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
        self._client = httpx.AsyncClient(transport=transport, base_url=base_url, timeout=_TIMEOUT)
        try:
            with anyio.CancelScope(shield=True):
                self._proc = await anyio.to_thread.run_sync(_spawn.spawn, spec, argv, env, workdir)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            raise SandboxCrashedError(f"could not start {argv[0]!r}: {exc}") from exc
        self._deadline = anyio.current_time() + spec.start_timeout
        await anyio.lowlevel.checkpoint()  # deliver a cancellation that waited

    async def _wait_ready(self) -> None:
        proc, client = self._proc, self._client
        assert proc is not None
        assert client is not None
        delay = 0.002
        while True:
            returncode = proc.poll()
            if returncode is not None:
                what = _spawn.describe_exit(returncode)
                raise await self._failure(
                    f"sandbox process {proc.pid} {what} before it was ready", returncode
                )
            # Skip HTTP while the socket does not exist yet: the common case.
            if self._socket is None or self.spec.bind == "tcp" or self._socket.exists():
                with anyio.move_on_after(max(0.1, self._deadline - anyio.current_time())):
                    try:
                        if (await client.get("/ping")).status_code == 200:
                            return
                    except httpx.TransportError:
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
        tail = await self.log_tail()
        details: dict[str, Any] = {"pid": self.pid, "exit_code": returncode}
        text = f"{message}\n--- log tail ---\n{tail}" if tail.strip() else message
        return SandboxCrashedError(text, details=details)

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
            what = _spawn.describe_exit(returncode)
        return await self._failure(f"sandbox process {proc.pid} {what}", returncode)

    async def pause(self) -> None:
        """SIGSTOP the whole process group. Idempotent."""
        if self._proc is not None and not self._closing and not self._paused:
            _spawn.signal_group(self._proc.pid, signal.SIGSTOP)
            self._paused = True

    async def resume(self) -> None:
        """SIGCONT the whole process group. Idempotent."""
        if self._proc is not None and self._paused and not self._closing:
            _spawn.signal_group(self._proc.pid, signal.SIGCONT)
            self._paused = False

    async def close(self) -> None:
        """Stop the process group, reap it, remove its files. Idempotent; never raises.

        Shielded from cancellation: the HTTP client is closed, then SIGCONT
        (a stopped process cannot act on SIGTERM) and SIGTERM go to the
        group; after up to ``close_grace`` seconds for the runtime to drain,
        SIGKILL goes to the group (ending any stragglers the agent started)
        and the process is reaped; then the workdir and socket are removed.
        Concurrent callers wait for the first one to finish.
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
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                _spawn.signal_group(proc.pid, signal.SIGCONT)
                _spawn.signal_group(proc.pid, signal.SIGTERM)
                await wait_exit(proc, self.spec.close_grace)
            _spawn.signal_group(proc.pid, signal.SIGKILL)
            if await wait_exit(proc, 10.0) is None:
                logger.error("sandbox process %s did not die after SIGKILL", proc.pid)
        self._paused = False
        paths = (self._workdir, self._extra_dir, self._socket)
        await anyio.to_thread.run_sync(_spawn.remove_paths, *paths)

    # --- turns ---------------------------------------------------------------------------

    def _live_client(self) -> httpx.AsyncClient:
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
        headers["accept"] = f"{CONTENT_JSON}, {CONTENT_SSE}"
        request = client.build_request(
            "POST", "/invocations", content=encode_json(call.payload), headers=headers
        )
        response: httpx.Response | None = None
        try:
            response = await client.send(request, stream=True)
            status = response.status_code
            if status == 200 and response.headers.get("content-type", "").startswith(CONTENT_SSE):
                stream = EventStream(response, self._crashed)
                response = None  # the stream owns it now
                return stream
            body = await response.aread()
        except (httpx.TransportError, httpx.StreamError) as exc:
            raise await self._crashed(exc) from exc
        finally:
            if response is not None:
                with anyio.CancelScope(shield=True):
                    await response.aclose()
        return decode_reply(status, body)

    async def ping(self) -> dict[str, Any]:
        """The agent's ``/ping`` body; SandboxCrashedError if it cannot be reached."""
        client = self._live_client()
        try:
            response = await client.get("/ping")
        except httpx.TransportError as exc:
            raise await self._crashed(exc) from exc
        answer = decode_reply(response.status_code, response.content, envelope=False)
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
