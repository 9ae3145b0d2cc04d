"""``app.run(port=8080)`` listens on loopback; exposing the agent takes an explicit host.

As the orchestrator's ``serve`` does, the runtime binds 127.0.0.1 unless told
otherwise; ``AgentConfig(host="0.0.0.0")`` (or ``run(host=...)``, ``--host``)
still exposes it. Real agent files, served in subprocesses.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ppio_sandbox.agent_runtime import AgentConfig
from tests.e2e.helpers import free_port

AGENT = """\
from ppio_sandbox.agent_runtime import AgentConfig, PPIOAgentRuntimeApp

app = PPIOAgentRuntimeApp({config})


@app.entrypoint
def agent(request):
    return {{"ok": True}}


if __name__ == "__main__":
    app.run(port={port})
"""


def test_the_default_host_is_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PPIO_AGENT_BIND", raising=False)
    assert AgentConfig().host == "127.0.0.1"
    assert AgentConfig(port=9000).resolve_bind() == "127.0.0.1:9000"
    assert AgentConfig(host="0.0.0.0").resolve_bind() == "0.0.0.0:8080"


def _serve(tmp_path: Path, argv: list[str], port: int) -> str:
    """Run ``argv`` until it answers on 127.0.0.1:port, stop it; its log."""
    log = tmp_path / f"agent-{port}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPIO_")}
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                reply = httpx.post(f"http://127.0.0.1:{port}/invocations", json={}, timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.02)
        assert reply.json()["result"] == {"ok": True}
        proc.terminate()
        assert proc.wait(15) == 0, log.read_text()
    finally:
        proc.kill()
        proc.wait(5)
    return log.read_text()


@pytest.mark.parametrize(
    ("config", "host"),
    [("", "127.0.0.1"), ('AgentConfig(host="0.0.0.0")', "0.0.0.0")],
    ids=["default", "explicit-0.0.0.0"],
)
def test_app_run_binds_the_configured_host(tmp_path: Path, config: str, host: str) -> None:
    port = free_port()
    agent = tmp_path / "agent.py"
    agent.write_text(AGENT.format(config=config, port=port))
    log = _serve(tmp_path, [sys.executable, str(agent)], port)
    assert f"agent runtime listening on {host}:{port}" in log


def test_the_module_runner_binds_loopback_unless_given_a_host(tmp_path: Path) -> None:
    agent = tmp_path / "agent.py"
    agent.write_text(AGENT.format(config="", port=1))
    port = free_port()
    runner = [sys.executable, "-m", "ppio_sandbox.agent_runtime", str(agent), "--port", str(port)]
    assert f"listening on 127.0.0.1:{port}" in _serve(tmp_path, runner, port)
    port = free_port()
    runner = [*runner[:-1], str(port), "--host", "0.0.0.0"]
    assert f"listening on 0.0.0.0:{port}" in _serve(tmp_path, runner, port)
