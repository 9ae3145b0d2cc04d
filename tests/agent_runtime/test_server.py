"""The runtime served by real hypercorn inside the test's event loop, on both backends."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from ppio_sandbox.agent_runtime import AgentConfig, PPIOAgentRuntimeApp, RequestContext
from ppio_sandbox.agent_runtime.server import serve
from ppio_sandbox.agent_runtime.sse import iter_events

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def running(app: PPIOAgentRuntimeApp, sock: Path) -> AsyncIterator[httpx.AsyncClient]:
    app.config.bind = f"unix:{sock}"
    shutdown = anyio.Event()
    transport = httpx.AsyncHTTPTransport(uds=str(sock))
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: serve(app, shutdown=shutdown, install_signal_handlers=False))
        async with httpx.AsyncClient(transport=transport, base_url="http://agent", timeout=10) as c:
            with anyio.fail_after(10):
                while True:
                    try:
                        if (await c.get("/ping")).status_code == 200:
                            break
                    except httpx.TransportError:
                        await anyio.sleep(0.01)
            try:
                yield c
            finally:
                shutdown.set()


async def test_invoke_and_ping_over_unix_socket(tmp_path: Path) -> None:
    app = PPIOAgentRuntimeApp()

    @app.entrypoint
    async def agent(request: dict[str, Any], context: RequestContext) -> dict[str, Any]:
        context.state["n"] = context.state.get("n", 0) + 1
        return {"n": context.state["n"], "sid": context.session_id}

    async with running(app, tmp_path / "a.sock") as c:
        for expected in (1, 2):
            r = await c.post("/invocations", json={"q": 1}, headers={"X-PPIO-Session-Id": "s"})
            assert r.status_code == 200
            assert r.json()["result"] == {"n": expected, "sid": "s"}
            assert r.headers["x-ppio-session-id"] == "s"
        assert (await c.get("/ping")).json()["status"] == "Healthy"
        assert (await c.get("/")).json()["entrypoint"] == "agent"


async def test_first_chunk_is_on_the_wire_before_the_second_is_produced(tmp_path: Path) -> None:
    app = PPIOAgentRuntimeApp()
    release = anyio.Event()

    @app.entrypoint
    async def agent(request: dict[str, Any]) -> AsyncIterator[str]:
        yield "first"
        await release.wait()  # the second chunk waits for the client to see the first
        yield "second"

    async with running(app, tmp_path / "a.sock") as c:
        async with c.stream("POST", "/invocations", json={}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = r.aiter_lines()
            events = []
            with anyio.fail_after(5):
                async for line in lines:
                    if line.startswith("data:"):
                        events.append(line)
                        release.set()
                    if line.startswith("event: done"):
                        break
        assert events[:2] == ['data: "first"', 'data: "second"']


async def test_disconnect_cancels_a_yield_only_generator(tmp_path: Path) -> None:
    app = PPIOAgentRuntimeApp()
    closed = anyio.Event()

    @app.entrypoint
    async def agent(request: dict[str, Any]) -> AsyncIterator[int]:
        i = 0
        try:
            while True:  # never awaits: only the runtime's checkpoint lets others run
                i += 1
                yield i
        finally:
            closed.set()

    async with running(app, tmp_path / "a.sock") as c:
        async with c.stream("POST", "/invocations", json={}) as r:
            async for line in r.aiter_lines():
                if line.startswith("id: 3"):
                    break
        with anyio.fail_after(5):
            await closed.wait()
        started = time.monotonic()
        assert (await c.get("/ping")).status_code == 200
        assert time.monotonic() - started < 1.0
        assert app.active_invocations == 0


async def test_timeout_mid_stream_ends_with_error_event(tmp_path: Path) -> None:
    app = PPIOAgentRuntimeApp(AgentConfig(timeout=0.3))

    @app.entrypoint
    async def agent(request: dict[str, Any]) -> AsyncIterator[str]:
        yield "one"
        await anyio.sleep(30)
        yield "never"

    async with running(app, tmp_path / "a.sock") as c:
        started = time.monotonic()
        r = await c.post("/invocations", json={})
        events = list(iter_events(iter(r.text.split("\n"))))
        assert [e.event for e in events] == ["message", "error"]
        assert events[1].json()["error"]["type"] == "InvocationTimeoutError"
        assert time.monotonic() - started < 3


async def test_timeout_non_streaming_is_504(tmp_path: Path) -> None:
    app = PPIOAgentRuntimeApp(AgentConfig(timeout=0.2))
    cancelled = anyio.Event()

    @app.entrypoint
    async def agent(request: dict[str, Any]) -> None:
        try:
            await anyio.sleep(30)
        finally:
            cancelled.set()

    async with running(app, tmp_path / "a.sock") as c:
        r = await c.post("/invocations", json={})
        assert r.status_code == 504
        assert r.json()["error"]["type"] == "InvocationTimeoutError"
        assert cancelled.is_set()


async def test_oversized_chunked_body_is_413(tmp_path: Path) -> None:
    app = PPIOAgentRuntimeApp(AgentConfig(max_request_size=100))
    app.entrypoint(lambda request: "never")

    async def body() -> AsyncIterator[bytes]:
        yield b'{"a": "' + b"x" * 80
        yield b"x" * 80 + b'"}'

    async with running(app, tmp_path / "a.sock") as c:
        r = await c.post(
            "/invocations", content=body(), headers={"content-type": "application/json"}
        )
        assert r.status_code == 413
        assert r.json()["error"]["type"] == "RequestTooLargeError"


async def test_cors_headers_and_preflight(tmp_path: Path) -> None:
    app = PPIOAgentRuntimeApp(AgentConfig(cors_origins=["https://ui.example"]))
    app.entrypoint(lambda request: "ok")

    async with running(app, tmp_path / "a.sock") as c:
        ok = await c.post("/invocations", json={}, headers={"origin": "https://ui.example"})
        assert ok.headers["access-control-allow-origin"] == "https://ui.example"
        other = await c.post("/invocations", json={}, headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        pre = await c.options(
            "/invocations",
            headers={"origin": "https://ui.example", "access-control-request-method": "POST"},
        )
        assert pre.status_code == 204
        assert "POST" in pre.headers["access-control-allow-methods"]


async def test_agent_error_is_500_and_debug_adds_traceback(tmp_path: Path) -> None:
    app = PPIOAgentRuntimeApp(debug=True)

    @app.entrypoint
    async def agent(request: dict[str, Any]) -> None:
        raise KeyError("missing")

    async with running(app, tmp_path / "a.sock") as c:
        r = await c.post("/invocations", json={})
        assert r.status_code == 500
        err = r.json()["error"]
        assert err["type"] == "InvocationError"
        assert err["message"] == "KeyError: 'missing'"
        assert "Traceback" in err["details"]["traceback"]
        assert (await c.post("/invocations", json={})).status_code == 500  # still serving


async def test_disconnect_cancels_a_suspended_non_streaming_invocation(tmp_path: Path) -> None:
    app = PPIOAgentRuntimeApp()
    cancelled = anyio.Event()

    @app.entrypoint
    async def agent(request: dict[str, Any]) -> str:
        with anyio.CancelScope():  # a scope of the agent's own, entered before it suspends
            try:
                await anyio.sleep(30)
            finally:
                cancelled.set()
        return "never"

    async with running(app, tmp_path / "a.sock") as c:
        with pytest.raises(httpx.ReadTimeout):
            await c.post("/invocations", json={}, timeout=0.3)
        with anyio.fail_after(5):
            await cancelled.wait()
        assert (await c.get("/ping")).json()["status"] == "Healthy"
