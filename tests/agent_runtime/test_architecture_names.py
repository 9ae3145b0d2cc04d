"""The original SDK's architecture names, importable and usable the obvious way.

Its README names ``PPIOAgentRuntimeServer`` (the HTTP server), ``RequestContext``,
``Models``, ``AgentRuntimeClient``, ``SandboxSession``, ``AuthManager``
(authentication) and ``TemplateManager`` (template discovery). Each is importable
from ``ppio_sandbox.agent_runtime`` (the client's lazily, so an agent never
imports httpx) and works against real servers here: an agent file served by
``PPIOAgentRuntimeServer(app).run()`` in a subprocess, ``await server.serve()``
in the test's loop on both backends, and ``ppio-sandbox-cli serve`` for the
client side.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.e2e.helpers import free_port
from tests.e2e.test_orchestrator_serve import ServeProcess

ROOT = Path(__file__).resolve().parents[2]
ECHO = ROOT / "tests" / "orchestrator" / "templates" / "echo"
KEY, SECRET = "arch-key", "arch-s3cret"
NAMES = (
    "PPIOAgentRuntimeServer",
    "RequestContext",
    "models",
    "AgentRuntimeClient",
    "SandboxSession",
    "AuthManager",
    "TemplateManager",
)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PPIO_")}


def test_every_name_imports_from_the_runtime_package() -> None:
    import ppio_sandbox.agent_runtime as runtime
    from ppio_sandbox import client
    from ppio_sandbox.agent_runtime import (
        AgentRuntimeClient,
        AuthManager,
        PPIOAgentRuntimeServer,
        RequestContext,
        SandboxSession,
        TemplateManager,
        models,
    )
    from ppio_sandbox.agent_runtime.context import RequestContext as ContextClass
    from ppio_sandbox.agent_runtime.server import PPIOAgentRuntimeServer as ServerClass

    assert PPIOAgentRuntimeServer is ServerClass
    assert RequestContext is ContextClass
    assert (AgentRuntimeClient, SandboxSession, AuthManager, TemplateManager) == (
        client.AgentRuntimeClient,
        client.SandboxSession,
        client.AuthManager,
        client.TemplateManager,
    )
    # Models: the data models in one module.
    assert models.InvocationRequest is runtime.InvocationRequest
    assert models.AgentConfig is runtime.AgentConfig
    assert models.AgentTemplate is client.AgentTemplate
    assert {"InvocationResponse", "PingStatus", "SessionInfo"} <= set(models.__all__)
    assert "PPIOAgentRuntimeServer" in runtime.__all__


def test_the_server_and_models_keep_an_agent_free_of_the_client() -> None:
    code = (
        "import sys\n"
        "from ppio_sandbox.agent_runtime import PPIOAgentRuntimeServer, RequestContext, models\n"
        "models.InvocationRequest, models.PingStatus\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('httpx', 'quart')"
        " or m.startswith(('ppio_sandbox.orchestrator', 'ppio_sandbox.client')))\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# -- PPIOAgentRuntimeServer ---------------------------------------------------------------------

SERVER_AGENT = """\
from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp, PPIOAgentRuntimeServer

app = PPIOAgentRuntimeApp()


@app.entrypoint
def agent(request):
    return {{"echo": request.get("prompt")}}


if __name__ == "__main__":
    server = PPIOAgentRuntimeServer(app, port={port})
    print("serving on", server.bind, flush=True)
    server.run()
"""


def test_server_run_serves_until_sigterm(tmp_path: Path) -> None:
    port = free_port()
    agent = tmp_path / "agent.py"
    agent.write_text(SERVER_AGENT.format(port=port))
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(agent)], stdout=out, stderr=subprocess.STDOUT, env=_clean_env()
        )
    try:
        reply = _post_when_ready(f"http://127.0.0.1:{port}", proc, log)
        assert reply == {"echo": "hi"}
        proc.terminate()
        assert proc.wait(15) == 0, log.read_text()
    finally:
        proc.kill()
        proc.wait(5)
    text = log.read_text()
    assert f"serving on 127.0.0.1:{port}" in text  # loopback unless told otherwise
    assert f"agent runtime listening on 127.0.0.1:{port}" in text


def _post_when_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> Any:
    with httpx.Client(base_url=url, timeout=2) as http:
        for _ in range(1500):
            if proc.poll() is not None:
                raise AssertionError(f"agent exited {proc.returncode}:\n{log.read_text()}")
            try:
                reply = http.post("/invocations", json={"prompt": "hi"})
            except httpx.TransportError:
                time.sleep(0.01)
                continue
            assert reply.status_code == 200, reply.text
            return reply.json()["result"]
    raise AssertionError(f"agent never answered:\n{log.read_text()}")


@pytest.mark.anyio
async def test_await_server_serve_until_shutdown(tmp_path: Path) -> None:
    from ppio_sandbox.agent_runtime import (
        PPIOAgentRuntimeApp,
        PPIOAgentRuntimeServer,
        RequestContext,
    )

    app = PPIOAgentRuntimeApp()

    @app.entrypoint
    async def agent(request: dict[str, Any], context: RequestContext) -> dict[str, Any]:
        return {"echo": request.get("prompt"), "session": context.session_id}

    sock = tmp_path / "a.sock"
    server = PPIOAgentRuntimeServer(app, bind=f"unix:{sock}", timeout=5)
    assert (server.bind, app.config.timeout) == (f"unix:{sock}", 5)
    transport = httpx.AsyncHTTPTransport(uds=str(sock))
    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: server.serve(install_signal_handlers=False))
            async with httpx.AsyncClient(transport=transport, base_url="http://agent") as c:
                while True:
                    try:
                        reply = await c.post(
                            "/invocations",
                            json={"prompt": "hi"},
                            headers={"X-PPIO-Session-Id": "s"},
                        )
                        break
                    except httpx.TransportError:
                        await anyio.sleep(0.01)
            assert reply.json()["result"] == {"echo": "hi", "session": "s"}
            server.shutdown()
        # serve() returned by itself: the task group ended without a cancel.
    assert not sock.exists()


def test_server_options_are_checked() -> None:
    from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp, PPIOAgentRuntimeServer

    with pytest.raises(TypeError, match="unknown server option 'colour'"):
        PPIOAgentRuntimeServer(PPIOAgentRuntimeApp(), colour="blue")
    with pytest.raises(ValueError, match="backend"):
        PPIOAgentRuntimeServer(PPIOAgentRuntimeApp(), backend="curio")


# -- the client side: AuthManager, TemplateManager, SandboxSession ------------------------------


@pytest.fixture(scope="module")
def orchestrator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    root = tmp_path_factory.mktemp("arch")
    args = ("--template", str(ECHO), "--api-key", f"arch:{KEY}:{SECRET}", "--log-level", "WARNING")
    with ServeProcess(root / "work", *args, data_dir=root / "data", tcp="127.0.0.1") as served:
        yield served


def test_auth_manager_signs_headers_the_orchestrator_accepts(orchestrator: ServeProcess) -> None:
    from ppio_sandbox.agent_runtime import AuthManager

    url = f"{orchestrator.base_url}/v1/sessions"
    body = b'{"template_id": "echo"}'
    content_type = {"content-type": "application/json"}
    signer = AuthManager(KEY, SECRET)
    with httpx.Client(timeout=10) as http:
        headers = signer.get_auth_headers("POST", url, body=body, headers=content_type)
        created = http.post(url, content=body, headers={**content_type, **headers})
        assert created.status_code == 201, created.text
        session = created.json()["session_id"]

        # The signature covers the body: another body with the same headers is refused.
        headers = signer.get_auth_headers("POST", url, body=body, headers=content_type)
        forged = http.post(
            url, content=b'{"template_id": "x"}', headers={**content_type, **headers}
        )
        assert forged.status_code == 401, forged.text

        bearer = AuthManager(SECRET).get_auth_headers()  # a key alone: the secret as a token
        assert bearer == {"Authorization": f"Bearer {SECRET}"}
        closed = http.delete(f"{url}/{session}", headers=bearer)
        assert closed.status_code == 200, closed.text

    with pytest.raises(ValueError, match="absolute url"):
        signer.get_auth_headers("GET")


@pytest.mark.anyio
async def test_template_manager_lists_and_gets_templates_through_a_client(
    orchestrator: ServeProcess,
) -> None:
    from ppio_sandbox.agent_runtime import (
        AgentRuntimeClient,
        ClientConfig,
        SandboxSession,
        TemplateManager,
    )

    config = ClientConfig(base_url=orchestrator.base_url, timeout=10)
    async with AgentRuntimeClient(api_key=KEY, api_secret=SECRET, config=config) as client:
        templates = TemplateManager(client)
        listed = await templates.list_templates()
        assert [t.name for t in listed] == ["echo"]
        echo = await templates.get_template("echo")
        assert (echo.template_id, echo.phase) == (listed[0].template_id, "deployed")
        assert (await templates.list_templates()) == listed  # served from its cache

        session = await client.create_session(template_id=echo.template_id)
        assert isinstance(session, SandboxSession)
        try:
            reply = await session.invoke({"prompt": "hi"})
            assert reply.result["echo"] == "hi"
        finally:
            await session.close()

    with pytest.raises(TypeError, match="needs an AgentRuntimeClient"):
        TemplateManager("http://127.0.0.1:8900")  # type: ignore[arg-type]
