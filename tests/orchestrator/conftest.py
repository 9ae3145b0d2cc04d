"""An orchestrator served by real hypercorn inside the test's event loop."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx

from ppio_sandbox.orchestrator.host import Orchestrator
from ppio_sandbox.orchestrator.server import ServeOptions, run

TEMPLATES = Path(__file__).parent / "templates"

_ECHO_PROCESS_YAML = """\
apiVersion: v1
kind: Agent
metadata:
  name: echo-process
  version: "1.0.0"
  description: The echo test agent, one process per session
spec:
  entrypoint: agent.py
  runtime:
    timeout: 5
    memory_limit: 1Gi
  sandbox:
    kind: process
    warm_pool: 1
"""


def template_dir(name: str, tmp_path: Path) -> Path:
    """A test template; ``echo_process`` is ``echo``'s agent as a process template."""
    if name != "echo_process":
        return TEMPLATES / name
    target = tmp_path / "templates" / name
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(TEMPLATES / "echo" / "agent.py", target / "agent.py")
    (target / ".ppio-agent.yaml").write_text(_ECHO_PROCESS_YAML)
    return target


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
        templates=[template_dir(name, tmp_path) for name in templates],
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
            # run() reports started once its socket listens: no polling.
            assert (await client.get("/ping")).status_code == 200
            try:
                yield Running(host, client, sock)
            finally:
                shutdown.set()
