"""Shared fixtures: both anyio backends, and real runtime servers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "agent_runtime"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_ready(
    url: str,
    *,
    proc: subprocess.Popen[Any] | None = None,
    timeout: float = 15.0,
    transport: httpx.HTTPTransport | None = None,
) -> None:
    """Poll ``url`` until it answers 200, the process dies, or the deadline passes."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    with httpx.Client(transport=transport, timeout=1.0) as client:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                out = proc.stdout.read() if proc.stdout else ""
                raise RuntimeError(f"server exited with {proc.returncode}:\n{out}")
            try:
                if client.get(url).status_code == 200:
                    return
            except httpx.TransportError as exc:
                last = exc
            time.sleep(0.02)
    raise TimeoutError(f"{url} not ready after {timeout} s (last error: {last})")


class AgentProcess:
    """An agent file served by ``python -m ppio_sandbox.agent_runtime`` in a subprocess."""

    def __init__(self, agent_file: Path, *extra_args: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ppio_sandbox.agent_runtime",
                str(agent_file),
                "--bind",
                f"127.0.0.1:{self.port}",
                *extra_args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=ROOT,
        )
        try:
            wait_until_ready(self.url + "/ping", proc=self.proc)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout:
            self.proc.stdout.close()
        return int(self.proc.returncode)


@pytest.fixture
def agent_process() -> Iterator[Any]:
    """Factory: ``agent_process(path, *args)`` starts an agent; all are stopped at teardown."""
    started: list[AgentProcess] = []

    def start(
        agent_file: Path | str, *args: str, env: dict[str, str] | None = None
    ) -> AgentProcess:
        proc = AgentProcess(Path(agent_file), *args, env=env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
