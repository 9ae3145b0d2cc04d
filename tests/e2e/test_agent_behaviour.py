"""The behaviour test agent on both backends: what reaches the agent, and what it raises.

An agent that raises gives 500 InvocationError with its message, and the
server carries on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.helpers import AGENTS, Server, assert_error, running


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    with running(Server(AGENTS / "behaviour_agent.py", backend=request.param)) as (server,):
        yield server


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client(timeout=5.0) as client:
        yield client


def test_agent_exception_is_500_invocation_error_with_message(client: httpx.Client) -> None:
    reply = client.post(
        "/invocations",
        json={"mode": "raise", "message": "the model is on fire"},
        headers={"X-PPIO-Request-Id": "boom-1"},
    )

    error = assert_error(reply, 500, "InvocationError")
    assert error["message"] == "RuntimeError: the model is on fire"
    assert error["request_id"] == "boom-1"
    assert reply.headers["x-ppio-request-id"] == "boom-1"


def test_exception_raised_after_the_agent_awaited_is_500(client: httpx.Client) -> None:
    reply = client.post("/invocations", json={"mode": "raise_after_await", "message": "gone"})

    error = assert_error(reply, 500, "InvocationError")
    assert error["message"] == "LookupError: gone"


def test_agent_own_cancel_scope_works_and_is_not_a_timeout(client: httpx.Client) -> None:
    start = time.monotonic()
    reply = client.post("/invocations", json={"mode": "own_scope", "seconds": 0.1})

    assert reply.status_code == 200, reply.text
    assert reply.json()["result"] == {"cancelled_caught": True}
    assert time.monotonic() - start < 2


def test_agent_raising_a_runtime_error_class_keeps_its_status(client: httpx.Client) -> None:
    reply = client.post(
        "/invocations", json={"mode": "raise_validation", "message": "temperature must be < 2"}
    )

    error = assert_error(reply, 400, "ValidationError")
    assert error["message"] == "temperature must be < 2"


def test_server_keeps_serving_after_an_agent_exception(client: httpx.Client) -> None:
    failed = client.post("/invocations", json={"mode": "raise"})
    reply = client.post("/invocations", json={"mode": "echo", "prompt": "next"})

    assert failed.status_code == 500
    assert reply.status_code == 200
    assert reply.json()["result"]["request"] == {"mode": "echo", "prompt": "next"}
    assert client.get("/ping").json()["status"] == "Healthy"


def test_body_reaches_the_agent_unchanged(client: httpx.Client) -> None:
    body = {
        "mode": "echo",
        "prompt": "p",
        "data": {"nested": [1, 2.5, None, True]},
        "metadata": {"user_id": "u1"},
        "custom_field": {"kept": "yes"},
        "unicode": "naïve ☃ 漢字",
    }
    reply = client.post("/invocations", json=body, headers={"X-PPIO-Session-Id": "s-body"})

    assert reply.status_code == 200
    result = reply.json()["result"]
    assert result["request"] == body
    assert result["metadata"] == {"user_id": "u1"}
    assert result["session_id"] == "s-body"


def test_bare_json_string_body_reaches_the_agent_as_the_prompt(client: httpx.Client) -> None:
    reply = client.post(
        "/invocations", content=b'"hello there"', headers={"Content-Type": "application/json"}
    )

    assert reply.status_code == 200, reply.text
    assert reply.json()["result"]["request"] == {"prompt": "hello there"}


def test_session_id_from_the_body_when_no_header(client: httpx.Client) -> None:
    reply = client.post("/invocations", json={"mode": "echo", "session_id": "from-body"})

    assert reply.json()["result"]["session_id"] == "from-body"
    assert reply.json()["metadata"]["session_id"] == "from-body"


def test_session_header_wins_over_the_body(client: httpx.Client) -> None:
    reply = client.post(
        "/invocations",
        json={"mode": "echo", "session_id": "from-body"},
        headers={"X-PPIO-Session-Id": "from-header"},
    )

    assert reply.json()["result"]["session_id"] == "from-header"
