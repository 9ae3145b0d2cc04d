"""An orchestrator served by real hypercorn inside the test's event loop."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx

from ppio_sandbox.orchestrator.host import Orchestrator
from ppio_sandbox.orchestrator.server import ServeOptions, run

TEMPLATES = Path(__file__).parent / "templates"


class Running:
    def __init__(self, host: Orchestrator, client: httpx.AsyncClient, sock: Path) -> None:
        self.host = host
        self.client = client
        self.sock = sock

    def other_client(self, **headers: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(self.sock)),
            base_url="http://orchestrator",
            headers=headers,
            timeout=20,
        )

    async def session(self, template: str = "echo", **body: Any) -> str:
        r = await self.client.post("/v1/sessions", json={"template_id": template, **body})
        assert r.status_code == 201, r.text
        return str(r.json()["session_id"])

    async def invoke(self, session_id: str, body: Any, **headers: str) -> httpx.Response:
        return await self.client.post(
            f"/v1/sessions/{session_id}/invocations", json=body, headers=headers
        )


@asynccontextmanager
async def orchestrator(
    tmp_path: Path,
    *,
    templates: tuple[str, ...] = ("echo",),
    headers: dict[str, str] | None = None,
    **options: Any,
) -> AsyncIterator[Running]:
    sock = tmp_path / "orchestrator.sock"
    opts = ServeOptions(
        bind=f"unix:{sock}",
        data_dir=tmp_path / "data",
        templates=[TEMPLATES / name for name in templates],
        environ={},
        grace=5,
        **options,
    )
    shutdown = anyio.Event()
    async with anyio.create_task_group() as tg:
        host: Orchestrator = await tg.start(
            lambda task_status: run(
                opts, shutdown=shutdown, install_signal_handlers=False, task_status=task_status
            )
        )
        async with httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(sock)),
            base_url="http://orchestrator",
            headers=headers or {},
            timeout=20,
        ) as client:
            with anyio.fail_after(10):
                while True:
                    try:
                        if (await client.get("/ping")).status_code == 200:
                            break
                    except httpx.TransportError:
                        await anyio.sleep(0.01)
            try:
                yield Running(host, client, sock)
            finally:
                shutdown.set()
