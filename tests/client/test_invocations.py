"""Invocations one-shot, in sessions, AgentCore style; encodings and request forms."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from ppio_sandbox.agent_runtime.protocol import decode_msgpack
from ppio_sandbox.client import InvocationRequest, InvocationStream

from .conftest import client_for, orchestrator

pytestmark = pytest.mark.anyio


async def test_one_shot_invocation_closes_the_session_it_created(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o, client_for(o) as client:
        seen: list[httpx.Request] = []

        async def record(request: httpx.Request) -> None:
            seen.append(request)

        client.http_client.event_hooks["request"].append(record)
        response = await client.invoke_agent("echo", {"prompt": "once"})
        assert response.result["turn"] == 1
        sid = response.session_id
        assert sid is not None
        assert sid.startswith("oneshot-")
        assert [(r.method, r.url.path) for r in seen] == [
            ("POST", "/v1/agents/echo/invocations"),
            ("DELETE", f"/v1/sessions/{sid}"),
        ]
        assert all(r.headers["Idempotency-Key"] for r in seen)
        assert o.host.list_sessions("default") == []


async def test_session_id_names_a_session_created_on_first_use(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o, client_for(o) as client:
        turns = [
            (await client.invoke_agent("echo", f"t{i}", session_id="conversation-1")).result
            for i in range(3)
        ]
        assert [t["turn"] for t in turns] == [1, 2, 3]
        assert {t["session_id"] for t in turns} == {"conversation-1"}
        session = await client.get_session("conversation-1")
        assert session.info.turns["ok"] == 3
        await session.close()


async def test_requests_may_be_a_prompt_a_dict_or_an_invocation_request(tmp_path: Path) -> None:
    async with (
        orchestrator(tmp_path) as o,
        client_for(o) as client,
        await client.create_session("echo") as session,
    ):
        assert (await session.invoke("plain")).result["echo"] == "plain"
        assert (await session.invoke({"prompt": "dict"})).result["echo"] == "dict"
        request = InvocationRequest.from_dict({"prompt": "struct", "action": "state"})
        state = (await session.invoke(request)).result["state"]
        assert state["turns"] == 3  # the extra field reached the agent


async def test_msgpack_wire_encodes_bodies_and_replies(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o, client_for(o, wire="msgpack") as client:
        bodies: list[tuple[str, bytes]] = []

        async def record(request: httpx.Request) -> None:
            if request.url.path.endswith("/invocations"):
                bodies.append((request.headers["content-type"], request.content))

        async def check_reply(response: httpx.Response) -> None:
            if response.request.url.path.endswith("/invocations"):
                assert response.headers["content-type"] == "application/msgpack"

        client.http_client.event_hooks["request"].append(record)
        client.http_client.event_hooks["response"].append(check_reply)
        response = await client.invoke_agent("echo", {"prompt": "packed", "data": {"n": 1}})
        assert response.result["echo"] == "packed"
        ctype, body = bodies[0]
        assert ctype == "application/msgpack"
        assert decode_msgpack(body) == {"prompt": "packed", "data": {"n": 1}}


async def test_invoke_agent_runtime_speaks_agentcore(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o, client_for(o) as client:
        first: dict[str, Any] = await client.invoke_agent_runtime(
            "echo", b'{"prompt": "raw bytes"}', qualifier="DEFAULT"
        )
        assert first["statusCode"] == 200
        assert first["contentType"] == "application/json"
        assert first["response"]["echo"] == "raw bytes"
        sid = first["runtimeSessionId"]
        again = await client.invoke_agent_runtime("echo", '{"prompt": "again"}', sid)
        assert again["runtimeSessionId"] == sid
        assert again["response"]["turn"] == 2  # the session was kept

        streamed = await client.invoke_agent_runtime(
            "echo", {"action": "stream", "count": 3}, runtimeSessionId=sid
        )
        assert streamed["contentType"] == "text/event-stream"
        chunks = streamed["response"]
        assert isinstance(chunks, InvocationStream)
        assert [c async for c in chunks] == [{"i": 0}, {"i": 1}, {"i": 2}]
        await client.close_session(sid)
