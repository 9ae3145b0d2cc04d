"""Servers under test: how to start one, wait until it answers, and stop it.

Each server is a subprocess bound to 127.0.0.1 on a free port, pinned to the
server CPU, with its output in a log file; it is stopped (SIGTERM, then
SIGKILL) however the ``with`` block ends, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import procs

__all__ = ["BASELINE", "RUNTIME", "RunningServer", "ServerError", "ServerSpec", "serve"]


class ServerError(RuntimeError):
    """A server exited or did not become ready in time."""


@dataclass(frozen=True)
class ServerSpec:
    """A server command; ``{bind}`` and ``{backend}`` are filled in at start."""

    name: str
    argv: tuple[str, ...]
    ready_path: str

    def command(self, bind: str, backend: str) -> list[str]:
        """The command line for one start."""
        return [arg.format(bind=bind, backend=backend) for arg in self.argv]


RUNTIME = ServerSpec(
    name="runtime",
    argv=(
        sys.executable,
        "-m",
        "ppio_sandbox.agent_runtime",
        "examples/agent_runtime/simple_agent.py",
        "--bind",
        "{bind}",
        "--backend",
        "{backend}",
        "--log-level",
        "WARNING",
    ),
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


@dataclass(frozen=True)
class RunningServer:
    """A started, ready server."""

    pid: int
    port: int
    startup_seconds: float
    log: Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers(port: int, path: str) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        conn.request("GET", path)
        return conn.getresponse().status < 500
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def wait_ready(proc: subprocess.Popen[bytes], port: int, path: str, timeout: float) -> None:
    """Poll ``GET path`` until it answers; fail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while not _answers(port, path):
        if time.monotonic() >= deadline:
            raise ServerError(f"not ready on port {port} after {timeout:g} s")
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
    """Start ``spec`` on ``backend``, yield it once ready, always stop it."""
    port = free_port()
    log = logdir / f"{spec.name}-{backend}-{port}.log"
    started = time.perf_counter()
    argv = spec.command(f"127.0.0.1:{port}", backend)
    with procs.running(argv, cpus=cpus, log=log, stop_timeout=stop_timeout) as proc:
        try:
            wait_ready(proc, port, spec.ready_path, startup_timeout)
        except ServerError as exc:
            raise ServerError(
                f"{spec.name} ({backend}): {exc}\n$ {' '.join(argv)}\n{procs.tail(log)}"
            ) from None
        yield RunningServer(proc.pid, port, time.perf_counter() - started, log)
