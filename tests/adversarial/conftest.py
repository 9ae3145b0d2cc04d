"""A real orchestrator, three tenants and a harmless agent, for hostile clients.

Tenants ``alpha`` and ``beta`` call with Bearer keys, ``gamma`` signs its
requests (HMAC). The ``fuzz`` template's agent echoes what it is sent and
never sleeps, streams or crashes on request, so every 5xx is the server's.
"""

from __future__ import annotations

import io
import re
import socket
import tarfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from ppio_sandbox.agent_runtime.signing import sign_request
from ppio_sandbox.orchestrator.host import Orchestrator
from ppio_sandbox.orchestrator.server import ServeOptions, run

from .raw import Reply, build_request, exchange

KEYS = ["alpha:ka:secret-alpha", "beta:kb:secret-beta", "gamma:kg:secret-gamma"]
BEARER = {"alpha": "Bearer secret-alpha", "beta": "Bearer secret-beta"}

AGENT = """\
from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp, RequestContext

app = PPIOAgentRuntimeApp()


@app.entrypoint
async def agent(request: dict, context: RequestContext):
    context.state["turns"] = context.state.get("turns", 0) + 1
    return {"turn": context.state["turns"], "echo": request}
"""

AGENT_YAML = """\
apiVersion: v1
kind: Agent
metadata:
  name: {name}
  version: "1.0.0"
spec:
  entrypoint: agent.py
  runtime:
    timeout: 30
"""
EXPLICIT_ID = """\
  sandbox:
    template_id: {template_id}
"""


def agent_dir(root: Path, name: str = "fuzz", extra: str = "") -> Path:
    """A template directory with the harmless agent (``extra`` varies its content)."""
    target = root / "templates" / name
    target.mkdir(parents=True, exist_ok=True)
    (target / "agent.py").write_text(AGENT + extra)
    (target / ".ppio-agent.yaml").write_text(AGENT_YAML.format(name=name))
    return target


def agent_archive(name: str, extra: str = "", template_id: str | None = None) -> bytes:
    """The harmless agent as an upload (tar.gz of its directory)."""
    spec = AGENT_YAML.format(name=name)
    if template_id is not None:
        spec += EXPLICIT_ID.format(template_id=template_id)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for filename, text in (("agent.py", AGENT + extra), (".ppio-agent.yaml", spec)):
            data = text.encode()
            info = tarfile.TarInfo(filename)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def vm_rss_kib() -> int:
    """This process's resident set size (the server runs in it), from /proc/self/status."""
    status = Path("/proc/self/status").read_text()
    found = re.search(r"^VmRSS:\s+(\d+) kB$", status, re.MULTILINE)
    assert found, status
    return int(found.group(1))


class Server:
    """A running orchestrator: where it listens, and how each tenant calls it."""

    def __init__(self, host: Orchestrator, target: Path | tuple[str, int]) -> None:
        self.host = host
        self.target = target

    def auth(
        self,
        tenant: str,
        method: str,
        path: str,
        body: bytes = b"",
        content_type: str | None = None,
        query: str = "",
    ) -> list[tuple[str, str]]:
        """The Authorization (and signing) headers of ``tenant`` for one request."""
        if tenant in BEARER:
            return [("authorization", BEARER[tenant])]
        headers = {"Host": "orchestrator"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        signed = sign_request(
            method, path, query, headers, body, access_key="kg", secret="secret-gamma"
        )
        return [(k.lower(), v) for k, v in signed.items()]

    async def call(
        self,
        tenant: str,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        content_type: str | None = "application/json",
        headers: list[tuple[str, str]] | None = None,
        timeout: float = 10.0,
    ) -> Reply:
        """One well-formed request of ``tenant`` (on a connection of its own)."""
        all_headers = list(headers or [])
        if content_type is not None:
            all_headers.append(("content-type", content_type))
        path_only, _, query = path.partition("?")
        all_headers += self.auth(tenant, method, path_only, body, content_type, query)
        request = build_request(method, path, all_headers, body)
        return await exchange(self.target, request, timeout=timeout)

    async def ping(self, timeout: float = 2.0) -> float:
        """Seconds ``GET /ping`` took; fails the test if it does not answer 200 in time."""
        started = anyio.current_time()
        reply = await exchange(self.target, build_request("GET", "/ping", []), timeout=timeout)
        assert reply.status == 200, reply
        return anyio.current_time() - started


@asynccontextmanager
async def serve(tmp_path: Path, *, tcp: bool = False, **options: Any) -> AsyncIterator[Server]:
    """The orchestrator with the three tenants' keys and the shared ``fuzz`` template,
    on a Unix socket (or a loopback TCP port)."""
    target: Path | tuple[str, int]
    if tcp:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            target = ("127.0.0.1", int(probe.getsockname()[1]))
        bind = f"127.0.0.1:{target[1]}"
    else:
        target = tmp_path / "adversarial.sock"
        bind = f"unix:{target}"
    opts = ServeOptions(
        bind=bind,
        data_dir=tmp_path / "data",
        templates=[agent_dir(tmp_path)],
        api_keys=KEYS,
        environ={},
        grace=2,
        **options,
    )
    shutdown = anyio.Event()
    async with anyio.create_task_group() as tg:
        host: Orchestrator = await tg.start(
            lambda task_status: run(
                opts, shutdown=shutdown, install_signal_handlers=False, task_status=task_status
            )
        )
        server = Server(host, target)
        await server.ping(timeout=10)
        try:
            yield server
        finally:
            shutdown.set()
