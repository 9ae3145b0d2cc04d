"""End-to-end fixtures: agents served by real runtime subprocesses."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.e2e.helpers import Server


@pytest.fixture
def anyio_backend() -> str:
    """The test client's event loop does not matter here: the servers are subprocesses.

    Tests that care about the backend run the *server* on both (``--backend``).
    """
    return "asyncio"


@pytest.fixture
def spawn() -> Iterator[Callable[..., Server]]:
    """Factory for fresh servers (``spawn(agent_file, ...)``), stopped at teardown."""
    started: list[Server] = []

    def start(*args: Any, ready: bool = True, **kwargs: Any) -> Server:
        server = Server(*args, **kwargs)
        started.append(server)
        if ready:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()
