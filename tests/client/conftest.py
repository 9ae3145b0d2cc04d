"""Clients against a real orchestrator served in-process (Unix socket or TCP)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.from_thread import start_blocking_portal

from ppio_sandbox.client import AgentRuntimeClient, ClientConfig
from ppio_sandbox.orchestrator.host import Orchestrator
from ppio_sandbox.orchestrator.server import ServeOptions, run
from tests.orchestrator.conftest import TEMPLATES, Running, orchestrator

__all__ = [
    "TEMPLATES",
    "Running",
    "client_for",
    "drain",
    "orchestrator",
    "tcp_orchestrator",
]


def client_for(
    o: Running,
    api_key: str | None = None,
    api_secret: str | None = None,
    **config: Any,
) -> AgentRuntimeClient:
    """A client of the orchestrator ``o`` over its Unix socket."""
    return AgentRuntimeClient(
        api_key,
        api_secret,
        ClientConfig(base_url="http://orchestrator", **config),
        transport=httpx.AsyncHTTPTransport(uds=str(o.sock)),
    )


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Running]:
    """An orchestrator on an event loop in a background thread (for the blocking facade)."""
    with (
        start_blocking_portal("asyncio") as portal,
        portal.wrap_async_context_manager(orchestrator(tmp_path)) as running,
    ):
        yield running


async def drain(chunks: AsyncIterator[Any], into: list[Any]) -> None:
    """Append every chunk of ``chunks`` to ``into`` (so a test can see what came first)."""
    async for chunk in chunks:
        into.append(chunk)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def tcp_orchestrator(
    tmp_path: Path, *, templates: tuple[str, ...] = ("echo",), **options: Any
) -> AsyncIterator[str]:
    """An orchestrator on a loopback TCP port; yields its base URL."""
    port = free_port()
    opts = ServeOptions(
        bind=f"127.0.0.1:{port}",
        data_dir=tmp_path / "data",
        templates=[TEMPLATES / name for name in templates],
        environ={},
        grace=5,
        **options,
    )
    base_url = f"http://127.0.0.1:{port}"
    shutdown = anyio.Event()
    async with anyio.create_task_group() as tg:
        _host: Orchestrator = await tg.start(
            lambda task_status: run(
                opts, shutdown=shutdown, install_signal_handlers=False, task_status=task_status
            )
        )
        async with httpx.AsyncClient(base_url=base_url) as probe:
            with anyio.fail_after(10):
                while True:
                    try:
                        if (await probe.get("/ping")).status_code == 200:
                            break
                    except httpx.TransportError:
                        await anyio.sleep(0.01)
        try:
            yield base_url
        finally:
            shutdown.set()
