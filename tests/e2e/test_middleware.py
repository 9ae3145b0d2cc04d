"""Middleware: the seed's user-id check, a wrapping middleware, request replacement, failures."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.helpers import AGENTS, Server, assert_error, running


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with running(Server(AGENTS / "middleware_agent.py")) as (server,):
        yield server


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client(timeout=5.0) as client:
        yield client


def test_missing_user_id_is_rejected_with_400(client: httpx.Client) -> None:
    reply = client.post(
        "/invocations", json={"prompt": "hi"}, headers={"X-PPIO-Request-Id": "mw-1"}
    )

    error = assert_error(reply, 400, "ValidationError")
    assert error["message"] == "User ID required"
    assert error["request_id"] == "mw-1"


def test_empty_user_id_is_rejected_with_400(client: httpx.Client) -> None:
    reply = client.post("/invocations", json={"prompt": "hi", "metadata": {"user_id": ""}})

    assert assert_error(reply, 400, "ValidationError")["message"] == "User ID required"


def test_user_id_lets_the_request_through(client: httpx.Client) -> None:
    body = {"prompt": "hi", "metadata": {"user_id": "u-42"}, "extra_field": [1, 2]}
    reply = client.post("/invocations", json=body, headers={"X-PPIO-Request-Id": "mw-ok"})

    assert reply.status_code == 200, reply.text
    result = reply.json()["result"]
    assert result["seen"] == body  # the middleware chain dropped no field
    assert result["user_id"] == "u-42"


def test_wrapping_middleware_adds_fields_to_the_result(client: httpx.Client) -> None:
    reply = client.post(
        "/invocations",
        json={"prompt": "hi", "metadata": {"user_id": "u-1"}},
        headers={"X-PPIO-Request-Id": "mw-stamp"},
    )

    result = reply.json()["result"]
    assert result["x_stamped_by"] == "stamp"
    assert result["x_request_id"] == "mw-stamp"


def test_middleware_replacement_request_is_what_the_entrypoint_sees(
    client: httpx.Client,
) -> None:
    reply = client.post(
        "/invocations",
        json={"prompt": "original", "data": {"rewrite": True}, "metadata": {"user_id": "u-2"}},
    )

    assert reply.status_code == 200, reply.text
    assert reply.json()["result"]["seen"] == {
        "prompt": "rewritten: original",
        "rewritten": True,
        "metadata": {"user_id": "u-2"},
        "data": {},  # the original body had "data"; the replacement left it empty
    }


def test_fields_of_unexpected_types_pass_through_the_chain_unchanged(
    client: httpx.Client,
) -> None:
    body = {
        "prompt": "x",
        "metadata": {"user_id": "u"},
        "stream": "yes",
        "data": [1, 2],
        "session_id": 7,
    }
    reply = client.post("/invocations", json=body)

    assert reply.status_code == 200, reply.text
    assert reply.json()["result"]["seen"] == body


def test_middleware_raising_a_plain_exception_is_500(client: httpx.Client) -> None:
    reply = client.post(
        "/invocations", json={"prompt": "x", "metadata": {"user_id": "u", "explode": True}}
    )

    error = assert_error(reply, 500, "InvocationError")
    assert error["message"] == "Exception: middleware blew up"


def test_server_keeps_serving_after_middleware_failures(client: httpx.Client) -> None:
    client.post("/invocations", json={"prompt": "x", "metadata": {"user_id": "u", "explode": 1}})
    client.post("/invocations", json={"prompt": "x"})
    reply = client.post("/invocations", json={"prompt": "ok", "metadata": {"user_id": "u"}})

    assert reply.status_code == 200
    assert client.get("/ping").json()["status"] == "Healthy"
