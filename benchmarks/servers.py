"""Servers under test: how to start one, wait until it answers, and stop it.

Each server is a subprocess bound to 127.0.0.1 on a free port, pinned to the
server CPU, with its output in a log file; it is stopped (SIGTERM, then
SIGKILL) however the ``with`` block ends, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import ROOT, procs

__all__ = [
    "AGENT_PROCESS",
    "AGENT_PROCESS_UVICORN",
    "BASELINE",
    "BASELINE_SSE",
    "BASELINE_UNAVAILABLE",
    "BASELINE_UVICORN",
    "HELLO_PROCESS_TEMPLATE",
    "HELLO_TEMPLATE",
    "ORCHESTRATOR",
    "ORCHESTRATOR_PROCESS",
    "ORCHESTRATOR_PROCESS_HYPERCORN",
    "ORCHESTRATOR_UVICORN",
    "RUNTIME",
    "RUNTIME_STREAM",
    "RUNTIME_UVICORN",
    "RunningServer",
    "ServerError",
    "ServerSpec",
    "serve",
    "unix_connection",
    "worker_for",
]

HELLO_TEMPLATE = ROOT / "benchmarks" / "templates" / "hello"
"""In-process benchmark template (``bench-hello``): answers ``{"ok": true}``."""
HELLO_PROCESS_TEMPLATE = ROOT / "benchmarks" / "templates" / "hello_process"
"""The same agent as a process template (``bench-hello-process``, warm pool 2)."""


class ServerError(RuntimeError):
    """A server exited or did not become ready in time."""


def worker_for(backend: str) -> str:
    """The orchestrator's ``--worker`` for a backend: uvloop on asyncio when installed.

    The same loop :mod:`benchmarks.hello_asgi` and the agent runtime pick.
    """
    if backend == "asyncio" and importlib.util.find_spec("uvloop") is not None:
        return "uvloop"
    return backend


@dataclass(frozen=True)
class ServerSpec:
    """A server command; ``{bind}``, ``{backend}``, ``{worker}`` (see
    :func:`worker_for`) and ``{data}`` (a fresh directory) are filled in at start.

    ``unix``: listen on a Unix socket (``{bind}`` is ``unix:/path``), not TCP.
    """

    name: str
    argv: tuple[str, ...]
    ready_path: str
    unix: bool = False

    def command(self, bind: str, backend: str, data: str = "DATA_DIR") -> list[str]:
        """The command line for one start."""
        worker = worker_for(backend)
        return [
            arg.format(bind=bind, backend=backend, worker=worker, data=data) for arg in self.argv
        ]


def _runtime_argv(agent: str) -> tuple[str, ...]:
    """The runtime's own CLI serving ``agent`` on ``{bind}`` and ``{backend}``."""
    return (
        sys.executable,
        "-m",
        "ppio_sandbox.agent_runtime",
        agent,
        "--bind",
        "{bind}",
        "--backend",
        "{backend}",
        "--log-level",
        "WARNING",
    )


RUNTIME = ServerSpec(
    name="runtime",
    argv=_runtime_argv("examples/agent_runtime/simple_agent.py"),
    ready_path="/ping",
)
"""The example agent served by the runtime's own CLI (hypercorn, uvloop or trio)."""

BASELINE = ServerSpec(
    name="baseline",
    argv=(
        sys.executable,
        "-m",
        "benchmarks.hello_asgi",
        "--bind",
        "{bind}",
        "--backend",
        "{backend}",
    ),
    ready_path="/",
)
"""A bare raw-ASGI hello world on hypercorn with the runtime's settings."""

RUNTIME_UVICORN = ServerSpec(
    name="runtime-uvicorn",
    argv=(*RUNTIME.argv, "--server", "uvicorn"),
    ready_path="/ping",
)
"""The example agent on the runtime's fast server option (``server="uvicorn"``;
asyncio only)."""

BASELINE_UVICORN = ServerSpec(
    name="baseline-uvicorn",
    argv=(*BASELINE.argv, "--server", "uvicorn"),
    ready_path="/",
)
"""The bare hello world on uvicorn with the runtime's uvicorn settings (asyncio only)."""

STREAM_AGENT = ROOT / "benchmarks" / "agents" / "stream_agent.py"
"""Benchmark agent streaming ``count`` chunks (default 1000)."""

RUNTIME_STREAM = ServerSpec(
    name="runtime",
    argv=_runtime_argv(str(STREAM_AGENT)),
    ready_path="/ping",
)
"""The streaming benchmark agent on the runtime (hypercorn, uvloop or trio)."""

BASELINE_SSE = ServerSpec(
    name="baseline",
    argv=(*BASELINE.argv, "--app", "sse"),
    ready_path="/",
)
"""A bare raw-ASGI SSE stream on hypercorn with the runtime's settings: the floor."""

BASELINE_UNAVAILABLE = ServerSpec(
    name="unavailable",
    argv=(*BASELINE.argv, "--app", "unavailable"),
    ready_path="/ping",
)
"""The hello world answering every request 503 but ``/ping`` (its readiness probe)."""


def _orchestrator_argv(template: Path) -> tuple[str, ...]:
    return (
        sys.executable,
        "-m",
        "ppio_sandbox.orchestrator.cli",
        "serve",
        "--bind",
        "{bind}",
        "--data-dir",
        "{data}",
        "--template",
        str(template),
        "--worker",
        "{worker}",
        "--grace",
        "5",
        "--log-level",
        "WARNING",
    )


ORCHESTRATOR = ServerSpec(
    name="orchestrator", argv=_orchestrator_argv(HELLO_TEMPLATE), ready_path="/ping"
)
"""The orchestrator (``ppio-sandbox-cli serve``) with the in-process hello template.

``/ping`` answers once the template is registered and deployed."""

ORCHESTRATOR_UVICORN = ServerSpec(
    name="orchestrator-uvicorn",
    argv=(*ORCHESTRATOR.argv, "--server", "uvicorn"),
    ready_path="/ping",
)
"""The same on ``serve --server uvicorn`` (httptools, uvloop; asyncio only)."""

ORCHESTRATOR_PROCESS = ServerSpec(
    name="orchestrator", argv=_orchestrator_argv(HELLO_PROCESS_TEMPLATE), ready_path="/ping"
)
"""The orchestrator with the process hello template (one agent process per session)."""

AGENT_PROCESS = ServerSpec(
    name="agent-direct",
    argv=(
        sys.executable,
        "-m",
        "ppio_sandbox.agent_runtime",
        str(HELLO_PROCESS_TEMPLATE / "agent.py"),
        "--bind",
        "{bind}",
        "--log-level",
        "WARNING",
    ),
    ready_path="/ping",
    unix=True,
)
"""The process template's agent served directly on a Unix socket by the runtime
CLI on its default server (hypercorn), as ``app.run()`` serves an agent."""

AGENT_PROCESS_UVICORN = ServerSpec(
    name="agent-direct-uvicorn",
    argv=(*AGENT_PROCESS.argv, "--server", "uvicorn"),
    ready_path="/ping",
    unix=True,
)
"""The same agent on uvicorn, as a process sandbox runs it when uvicorn is installed
(``serve --sandbox-server auto``)."""

ORCHESTRATOR_PROCESS_HYPERCORN = ServerSpec(
    name="orchestrator-sandbox-hypercorn",
    argv=(*ORCHESTRATOR_PROCESS.argv, "--sandbox-server", "hypercorn"),
    ready_path="/ping",
)
"""The orchestrator with its process sandboxes' runtime on hypercorn."""


@dataclass(frozen=True)
class RunningServer:
    """A started, ready server (``port`` 0 and ``unix`` set for a Unix socket)."""

    pid: int
    port: int
    startup_seconds: float
    log: Path
    unix: Path | None = None
    data: Path | None = None
    """Its ``{data}`` directory (an orchestrator's ``--data-dir``)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def unix_connection(path: Path, timeout: float) -> http.client.HTTPConnection:
    """An ``http.client`` connection over the Unix socket at ``path``."""
    return _UnixHTTPConnection(str(path), timeout)


def _answers(address: int | Path, path: str) -> bool:
    conn: http.client.HTTPConnection
    if isinstance(address, Path):
        conn = unix_connection(address, timeout=1.0)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", address, timeout=1.0)
    try:
        conn.request("GET", path)
        return conn.getresponse().status < 500
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def wait_ready(
    proc: subprocess.Popen[bytes], address: int | Path, path: str, timeout: float
) -> None:
    """Poll ``GET path`` until it answers; fail if the process exits or time runs out.

    ``address``: a TCP port on 127.0.0.1, or a Unix socket path.
    """
    deadline = time.monotonic() + timeout
    while not _answers(address, path):
        if time.monotonic() >= deadline:
            raise ServerError(f"not ready on {address} after {timeout:g} s")
        with contextlib.suppress(subprocess.TimeoutExpired):
            # The poll interval, which also notices an early exit at once.
            code = proc.wait(0.05)
            raise ServerError(f"exited with code {code} before answering")


@contextlib.contextmanager
def serve(
    spec: ServerSpec,
    backend: str,
    *,
    cpus: frozenset[int] | None,
    logdir: Path,
    startup_timeout: float,
    stop_timeout: float,
) -> Iterator[RunningServer]:
    """Start ``spec`` on ``backend``, yield it once ready, always stop it.

    Its log and its ``{data}`` directory are fresh entries in ``logdir``.
    """
    port = free_port()
    stem = logdir / f"{spec.name}-{backend}-{port}"
    log = stem.with_suffix(".log")
    data = stem.with_suffix(".data")
    unix = stem.with_suffix(".sock") if spec.unix else None
    bind = f"unix:{unix}" if unix is not None else f"127.0.0.1:{port}"
    started = time.perf_counter()
    argv = spec.command(bind, backend, str(data))
    with procs.running(argv, cpus=cpus, log=log, stop_timeout=stop_timeout) as proc:
        try:
            wait_ready(proc, unix or port, spec.ready_path, startup_timeout)
        except ServerError as exc:
            raise ServerError(
                f"{spec.name} ({backend}): {exc}\n$ {' '.join(argv)}\n{procs.tail(log)}"
            ) from None
        yield RunningServer(
            proc.pid, 0 if unix else port, time.perf_counter() - started, log, unix, data
        )
