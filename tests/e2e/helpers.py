"""Helpers for end-to-end tests: real runtime processes and an SSE reader.

A :class:`Server` runs ``python -m ppio_sandbox.agent_runtime FILE`` as a
subprocess. Its output goes to a file, never to an unread pipe: a chatty
server (``debug=True`` logs every invocation) would otherwise block once the
pipe buffer fills.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "agent_runtime"
AGENTS = Path(__file__).resolve().parent / "agents"
READY_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def refused_port() -> Iterator[int]:
    """A 127.0.0.1 port that refuses connections for as long as the block runs.

    The socket stays bound but never listens, so a connection gets a reset and
    no other server (say, one a parallel test starts) can take the port in the
    meantime: a port from :func:`free_port` has no such guarantee.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout: float, interval: float = 0.01
) -> float:
    """Poll ``await check()`` until true; returns the seconds it took.

    Fails (``TimeoutError``) at the deadline: waiting is always bounded.
    """
    start = time.monotonic()
    with anyio.fail_after(timeout):
        while True:
            if await check():
                return time.monotonic() - start
            await anyio.sleep(interval)


class Server:
    """One agent file served in a subprocess.

    ``bind`` is passed as ``--bind`` (default: a free TCP port on 127.0.0.1);
    ``bind=None`` with ``use_bind_flag=False`` passes no address at all, so
    the environment decides (``PPIO_AGENT_BIND``). ``uds`` names the unix
    socket to talk to instead of TCP.
    """

    def __init__(
        self,
        agent_file: Path | str,
        *args: str,
        backend: str | None = None,
        app: str | None = None,
        bind: str | None = None,
        use_bind_flag: bool = True,
        uds: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.uds = uds
        self.backend = backend or "asyncio"
        self._pick_port = use_bind_flag and bind is None
        self._bind = bind
        self._use_bind_flag = use_bind_flag
        self._tail = [
            *(["--backend", backend] if backend else []),
            *(["--app", app] if app else []),
        ]
        self._tail += list(args)
        self._agent_file = str(agent_file)
        self._env = {**os.environ, **(env or {})}
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in stop()
            "w+", prefix="ppio-e2e-", suffix=".log", delete=False
        )
        self._launch()

    def _launch(self) -> None:
        bind = f"127.0.0.1:{free_port()}" if self._pick_port else self._bind
        cmd = [sys.executable, "-m", "ppio_sandbox.agent_runtime", self._agent_file]
        if self._use_bind_flag:
            cmd += ["--bind", str(bind)]
        if bind and not bind.startswith("unix:"):
            self.url = f"http://{bind}"
        else:
            self.url = "http://agent"  # host is ignored on a unix socket
        self._log.seek(0)
        self._log.truncate()
        self.proc = subprocess.Popen(
            [*cmd, *self._tail],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self._env,
            cwd=ROOT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def transport(self) -> httpx.HTTPTransport | None:
        return httpx.HTTPTransport(uds=self.uds) if self.uds else None

    def async_transport(self) -> httpx.AsyncHTTPTransport | None:
        return httpx.AsyncHTTPTransport(uds=self.uds) if self.uds else None

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 10.0)
        return httpx.Client(base_url=self.url, transport=self.transport(), **kwargs)

    def async_client(self, **kwargs: Any) -> httpx.AsyncClient:
        kwargs.setdefault("timeout", 10.0)
        return httpx.AsyncClient(base_url=self.url, transport=self.async_transport(), **kwargs)

    def output(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def wait_ready(self, timeout: float = READY_TIMEOUT, *, retries: int = 2) -> Server:
        """Poll ``/ping`` until 200 (bounded); fail early if the process dies.

        A free port can be taken by someone else between ``free_port()`` and
        the server's bind: then the server is started again on another one.
        """
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                output = self.output()
                if self._pick_port and retries > 0 and "address already in use" in output.lower():
                    retries -= 1
                    self._launch()
                    continue
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{output}")
            try:
                with self.client(timeout=1.0) as client:
                    if client.get("/ping").status_code == 200:
                        return self
            except httpx.TransportError as exc:
                last = exc
            time.sleep(0.01)
        raise TimeoutError(f"{self.url} not ready after {timeout} s ({last}):\n{self.output()}")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if not self._log.closed:
            self._log.close()
            Path(self._log.name).unlink(missing_ok=True)
        return int(self.proc.returncode)

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far (Linux ``/proc``)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        # After the ")" that ends the command name, utime and stime are fields 12 and 13.
        ticks = int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")


@contextmanager
def running(*servers: Server) -> Iterator[tuple[Server, ...]]:
    """Wait until all ``servers`` (already started, so they boot in parallel) are ready."""
    try:
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


@dataclass
class SSEEvent:
    event: str
    id: str | None
    data: str


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[SSEEvent]:
    """Parse Server-Sent Events from ``response.aiter_lines()`` (a deliberately small reader)."""
    event, ident, data = "message", None, []
    async for line in lines:
        if line == "":
            if data:
                yield SSEEvent(event, ident, "\n".join(data))
            event, ident, data = "message", None, []
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "id":
            ident = value
        elif name == "data":
            data.append(value)
    if data:
        yield SSEEvent(event, ident, "\n".join(data))


def assert_error(response: httpx.Response, status: int, error_type: str) -> dict[str, Any]:
    """Check a reply is ``status`` with the error envelope of ``error_type``; return the error."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"type", "message", "request_id"} <= set(error), error
    assert error["type"] == error_type, error
    assert isinstance(error["message"], str)
    assert error["message"], error
    return dict(error)


async def is_busy(client: httpx.AsyncClient) -> bool:
    """Whether ``/ping`` says HealthyBusy (an invocation or tracked task is running)."""
    return bool((await client.get("/ping")).json()["status"] == "HealthyBusy")
