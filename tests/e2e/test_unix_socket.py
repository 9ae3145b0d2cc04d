"""Serving on a unix socket: from $PPIO_AGENT_BIND or --bind unix:..."""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.helpers import AGENTS, EXAMPLES, Server


@pytest.fixture
def sock_path() -> Iterator[Path]:
    # Short, under /tmp: a unix socket path is limited to ~108 bytes.
    folder = Path(tempfile.mkdtemp(prefix="ppio-e2e-", dir="/tmp"))
    yield folder / "agent.sock"
    for child in folder.iterdir():
        child.unlink()
    folder.rmdir()


def check_serves(server: Server, session: str) -> None:
    with server.client() as client:
        ping = client.get("/ping")
        reply = client.post(
            "/invocations", json={"query": "over uds"}, headers={"X-PPIO-Session-Id": session}
        )
    assert ping.status_code == 200
    assert ping.json()["status"] == "Healthy"
    assert reply.status_code == 200
    assert reply.json()["result"]["response"] == "Processed: over uds"
    assert reply.json()["metadata"]["session_id"] == session


def test_ppio_agent_bind_env_makes_the_runtime_listen_on_a_unix_socket(
    spawn: Callable[..., Server], sock_path: Path
) -> None:
    server = spawn(
        EXAMPLES / "simple_agent.py",
        use_bind_flag=False,
        uds=str(sock_path),
        env={"PPIO_AGENT_BIND": f"unix:{sock_path}"},
    )

    assert stat.S_ISSOCK(os.stat(sock_path).st_mode)
    check_serves(server, "uds-env")


def test_bind_flag_unix_listens_on_the_socket(
    spawn: Callable[..., Server], sock_path: Path
) -> None:
    server = spawn(EXAMPLES / "simple_agent.py", bind=f"unix:{sock_path}", uds=str(sock_path))

    check_serves(server, "uds-flag")


def test_env_bind_wins_over_the_bind_flag(spawn: Callable[..., Server], sock_path: Path) -> None:
    other = sock_path.with_name("ignored.sock")
    server = spawn(
        EXAMPLES / "simple_agent.py",
        bind=f"unix:{other}",
        uds=str(sock_path),
        env={"PPIO_AGENT_BIND": f"unix:{sock_path}"},
    )

    check_serves(server, "uds-env-wins")
    assert not other.exists()


def test_socket_file_is_removed_on_clean_shutdown(
    spawn: Callable[..., Server], sock_path: Path
) -> None:
    server = spawn(AGENTS / "behaviour_agent.py", bind=f"unix:{sock_path}", uds=str(sock_path))
    assert sock_path.exists()

    assert server.stop() == 0
    assert not sock_path.exists()


def test_stale_socket_file_is_replaced(spawn: Callable[..., Server], sock_path: Path) -> None:
    # A socket file left behind by a killed process: bound, then closed.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(sock_path))
    assert stat.S_ISSOCK(os.stat(sock_path).st_mode)

    server = spawn(EXAMPLES / "simple_agent.py", bind=f"unix:{sock_path}", uds=str(sock_path))

    check_serves(server, "uds-stale")


def test_unix_socket_on_trio(spawn: Callable[..., Server], sock_path: Path) -> None:
    server = spawn(
        EXAMPLES / "simple_agent.py",
        backend="trio",
        use_bind_flag=False,
        uds=str(sock_path),
        env={"PPIO_AGENT_BIND": f"unix:{sock_path}"},
    )

    check_serves(server, "uds-trio")
