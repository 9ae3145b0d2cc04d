"""The seed's simple agent (examples/agent_runtime/simple_agent.py), verbatim, over HTTP."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import anyio
import httpx
import msgspec
import pytest

from tests.e2e.helpers import EXAMPLES, Server, running

# The format of a generated id is the runtime's choice; it must be a header-safe token.
TOKEN = re.compile(r"^[0-9A-Za-z_-]{8,128}$")


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with running(Server(EXAMPLES / "simple_agent.py")) as (server,):
        yield server


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def test_query_is_processed_with_session_and_aware_timestamp(client: httpx.Client) -> None:
    before = datetime.now(UTC)
    reply = client.post(
        "/invocations", json={"query": "hello"}, headers={"X-PPIO-Session-Id": "sess-hello"}
    )
    after = datetime.now(UTC)

    assert reply.status_code == 200
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    result = body["result"]
    assert result["response"] == "Processed: hello"
    assert result["session_id"] == "sess-hello"
    stamp = datetime.fromisoformat(result["timestamp"])
    assert stamp.tzinfo is not None
    assert stamp.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= stamp <= after + timedelta(seconds=1)


def test_reply_envelope_has_exactly_the_contract_fields(client: httpx.Client) -> None:
    reply = client.post(
        "/invocations",
        json={"query": "shape"},
        headers={"X-PPIO-Session-Id": "sess-shape", "X-PPIO-Request-Id": "req-shape-1"},
    )

    assert reply.status_code == 200
    body = reply.json()
    assert set(body) == {"result", "status", "duration", "metadata"}
    assert body["status"] == "success"
    assert isinstance(body["duration"], float)
    assert 0 <= body["duration"] < 5
    assert body["metadata"] == {"request_id": "req-shape-1", "session_id": "sess-shape"}
    assert reply.headers["x-ppio-session-id"] == "sess-shape"


def test_request_id_header_is_echoed(client: httpx.Client) -> None:
    reply = client.post(
        "/invocations", json={"query": "x"}, headers={"X-PPIO-Request-Id": "my-request-42"}
    )

    assert reply.status_code == 200
    assert reply.headers["x-ppio-request-id"] == "my-request-42"
    assert reply.json()["metadata"]["request_id"] == "my-request-42"


def test_request_id_is_generated_fresh_when_absent(client: httpx.Client) -> None:
    first = client.post("/invocations", json={"query": "a"})
    second = client.post("/invocations", json={"query": "b"})

    ids = [r.headers["x-ppio-request-id"] for r in (first, second)]
    assert all(TOKEN.match(i) for i in ids), ids
    assert ids[0] != ids[1]
    assert [r.json()["metadata"]["request_id"] for r in (first, second)] == ids
    # Without a session header there is no session.
    assert first.json()["metadata"]["session_id"] is None
    assert "x-ppio-session-id" not in first.headers


def test_agentcore_session_header_is_understood(client: httpx.Client) -> None:
    reply = client.post(
        "/invocations",
        json={"query": "aws"},
        headers={"X-Amzn-Bedrock-AgentCore-Runtime-Session-Id": "agentcore-session-7"},
    )

    assert reply.status_code == 200
    body = reply.json()
    assert body["result"]["session_id"] == "agentcore-session-7"
    assert body["metadata"]["session_id"] == "agentcore-session-7"
    assert reply.headers["x-ppio-session-id"] == "agentcore-session-7"


def test_ping_reports_healthy_with_custom_service_field(client: httpx.Client) -> None:
    before = int(time.time())
    reply = client.get("/ping")

    assert reply.status_code == 200
    body = reply.json()
    assert body["status"] == "Healthy"
    assert body["service"] == "My Agent"
    assert set(body) == {"status", "service", "time_of_last_update"}
    assert type(body["time_of_last_update"]) is int
    # Set when the server started (or last changed status), never in the future.
    assert before - 120 <= body["time_of_last_update"] <= int(time.time())


def test_root_describes_the_service(client: httpx.Client) -> None:
    info = client.get("/").json()

    assert info["entrypoint"] == "my_agent"
    assert info["streaming"] is False
    assert info["endpoints"] == {"invoke": "POST /invocations", "health": "GET /ping"}


def test_session_state_counts_turns_per_session_when_interleaved(client: httpx.Client) -> None:
    def turn(session: str) -> int:
        reply = client.post(
            "/invocations", json={"query": "t"}, headers={"X-PPIO-Session-Id": session}
        )
        assert reply.status_code == 200
        return int(reply.json()["result"]["turn"])

    order = ["state-a", "state-b", "state-a", "state-a", "state-b", "state-c", "state-b"]
    assert [turn(s) for s in order] == [1, 1, 2, 3, 2, 1, 3]


def test_requests_without_a_session_do_not_share_state(client: httpx.Client) -> None:
    turns = [client.post("/invocations", json={"query": "x"}).json()["result"]["turn"]]
    turns.append(client.post("/invocations", json={"query": "x"}).json()["result"]["turn"])
    assert turns == [1, 1]


def test_msgpack_request_body_is_decoded(client: httpx.Client) -> None:
    reply = client.post(
        "/invocations",
        content=msgspec.msgpack.encode({"query": "packed"}),
        headers={"Content-Type": "application/msgpack", "X-PPIO-Session-Id": "mp-1"},
    )

    assert reply.status_code == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.json()["result"]["response"] == "Processed: packed"


def test_accept_msgpack_gives_a_msgpack_reply(client: httpx.Client) -> None:
    reply = client.post(
        "/invocations",
        content=msgspec.msgpack.encode({"query": "both ways"}),
        headers={
            "Content-Type": "application/msgpack",
            "Accept": "application/msgpack",
            "X-PPIO-Session-Id": "mp-2",
            "X-PPIO-Request-Id": "mp-req",
        },
    )

    assert reply.status_code == 200
    assert reply.headers["content-type"] == "application/msgpack"
    body = msgspec.msgpack.decode(reply.content)
    assert body["status"] == "success"
    assert body["result"]["response"] == "Processed: both ways"
    assert body["metadata"] == {"request_id": "mp-req", "session_id": "mp-2"}


@pytest.mark.anyio
async def test_300_parallel_invocations_each_get_their_own_session(server: Server) -> None:
    n = 300
    answers: dict[int, tuple[int, dict]] = {}
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)

    async with server.async_client(limits=limits, timeout=30.0) as client:

        async def call(i: int) -> None:
            reply = await client.post(
                "/invocations",
                json={"query": f"q{i}"},
                headers={"X-PPIO-Session-Id": f"par-{i}", "X-PPIO-Request-Id": f"par-req-{i}"},
            )
            answers[i] = (reply.status_code, reply.json())

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(call, i)

    assert sorted(answers) == list(range(n))
    for i, (status, body) in answers.items():
        assert status == 200, body
        assert body["result"]["response"] == f"Processed: q{i}"
        assert body["result"]["session_id"] == f"par-{i}"
        assert body["result"]["turn"] == 1
        assert body["metadata"] == {"request_id": f"par-req-{i}", "session_id": f"par-{i}"}
