"""The seed's simple agent served with --backend trio (streaming on trio: test_streaming)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

import httpx
import msgspec
import pytest

from tests.e2e.helpers import EXAMPLES, Server, assert_error, running


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with running(Server(EXAMPLES / "simple_agent.py", backend="trio")) as (server,):
        yield server


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client(timeout=5.0) as client:
        yield client


def test_simple_flow_on_trio(client: httpx.Client) -> None:
    reply = client.post(
        "/invocations",
        json={"query": "hello"},
        headers={"X-PPIO-Session-Id": "trio-1", "X-PPIO-Request-Id": "trio-req"},
    )

    assert reply.status_code == 200
    body = reply.json()
    assert body["result"]["response"] == "Processed: hello"
    assert body["result"]["session_id"] == "trio-1"
    assert datetime.fromisoformat(body["result"]["timestamp"]).tzinfo is not None
    assert body["status"] == "success"
    assert body["metadata"] == {"request_id": "trio-req", "session_id": "trio-1"}
    assert reply.headers["x-ppio-request-id"] == "trio-req"


def test_ping_on_trio_runs_the_sync_handler(client: httpx.Client) -> None:
    body = client.get("/ping").json()

    assert body["status"] == "Healthy"
    assert body["service"] == "My Agent"


def test_session_state_on_trio(client: httpx.Client) -> None:
    def turn(session: str) -> int:
        reply = client.post("/invocations", json={}, headers={"X-PPIO-Session-Id": session})
        return int(reply.json()["result"]["turn"])

    assert [turn(s) for s in ["tA", "tB", "tA", "tB", "tA"]] == [1, 1, 2, 2, 3]


def test_errors_and_msgpack_on_trio(client: httpx.Client) -> None:
    assert_error(
        client.post("/invocations", content=b"{", headers={"Content-Type": "application/json"}),
        400,
        "ValidationError",
    )
    reply = client.post(
        "/invocations",
        content=msgspec.msgpack.encode({"query": "mp"}),
        headers={"Content-Type": "application/msgpack", "Accept": "application/msgpack"},
    )
    assert reply.status_code == 200
    assert msgspec.msgpack.decode(reply.content)["result"]["response"] == "Processed: mp"
