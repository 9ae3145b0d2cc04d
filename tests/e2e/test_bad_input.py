"""Every bad request gets a clear 4xx with the error envelope: never a 500, never a hang."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.helpers import EXAMPLES, Server, assert_error, running


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with running(Server(EXAMPLES / "simple_agent.py")) as (server,):
        yield server


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    # A short timeout: a hang is a failure, not a slow pass.
    with server.client(timeout=5.0) as client:
        yield client


def post_raw(client: httpx.Client, body: bytes, content_type: str = "application/json", **kw):
    headers = {"Content-Type": content_type, **kw.pop("headers", {})}
    return client.post("/invocations", content=body, headers=headers, **kw)


def test_malformed_json_is_400_validation_error(client: httpx.Client) -> None:
    reply = post_raw(client, b'{"query": "unterminated', headers={"X-PPIO-Request-Id": "bad-1"})

    error = assert_error(reply, 400, "ValidationError")
    assert error["message"].startswith("malformed body")
    assert error["request_id"] == "bad-1"
    assert reply.headers["x-ppio-request-id"] == "bad-1"


def test_invalid_utf8_is_400(client: httpx.Client) -> None:
    reply = post_raw(client, b'{"query": "caf\xe9 \xff\xfe"}')

    error = assert_error(reply, 400, "ValidationError")
    assert "UTF-8" in error["message"]
    assert error["request_id"] == reply.headers["x-ppio-request-id"]


def test_deeply_nested_arrays_are_400_not_a_crash(client: httpx.Client, server: Server) -> None:
    reply = post_raw(client, b"[" * 100_000)

    assert_error(reply, 400, "ValidationError")
    assert server.proc.poll() is None
    assert client.get("/ping").status_code == 200


def test_deeply_nested_objects_are_400(client: httpx.Client) -> None:
    reply = post_raw(client, b'{"a":' * 50_000)

    assert_error(reply, 400, "ValidationError")


def test_empty_body_is_400(client: httpx.Client) -> None:
    reply = post_raw(client, b"")

    error = assert_error(reply, 400, "ValidationError")
    assert "empty body" in error["message"]


def test_text_plain_is_415_unsupported_media_type(client: httpx.Client) -> None:
    reply = post_raw(client, b"hello", content_type="text/plain")

    error = assert_error(reply, 415, "UnsupportedMediaTypeError")
    assert "text/plain" in error["message"]


def test_json_array_body_is_400(client: httpx.Client) -> None:
    reply = post_raw(client, b'[{"query": "in a list"}]')

    error = assert_error(reply, 400, "ValidationError")
    assert "array" in error["message"]


@pytest.mark.parametrize("body", [b"null", b"42", b"true"])
def test_json_scalar_body_is_400(client: httpx.Client, body: bytes) -> None:
    assert_error(post_raw(client, body), 400, "ValidationError")


def test_bare_json_string_becomes_the_prompt(client: httpx.Client) -> None:
    reply = post_raw(client, b'"just a prompt"')

    assert reply.status_code == 200, reply.text
    # simple_agent reads "query", so the prompt does not reach its answer...
    assert reply.json()["result"]["response"] == "Processed: "
    assert reply.json()["status"] == "success"


def test_malformed_msgpack_is_400(client: httpx.Client) -> None:
    reply = post_raw(client, b"\xc1\xc1\xc1", content_type="application/msgpack")

    assert_error(reply, 400, "ValidationError")


def test_invalid_content_length_is_400(server: Server) -> None:
    # httpx refuses to send this, so speak HTTP/1.1 by hand. The HTTP server
    # (h11) rejects the request before the runtime sees it: a bare 400.
    host, port = server.url.removeprefix("http://").split(":")
    request = (
        b"POST /invocations HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
        b"Content-Length: abc\r\nConnection: close\r\n\r\n{}"
    )
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk

    assert answer.startswith(b"HTTP/1.1 400"), answer


def test_unknown_route_is_404_not_found(client: httpx.Client) -> None:
    reply = client.get("/no/such/route")

    error = assert_error(reply, 404, "NotFoundError")
    assert "/no/such/route" in error["message"]


def test_get_invocations_is_405_with_allow_header(client: httpx.Client) -> None:
    reply = client.get("/invocations")

    error = assert_error(reply, 405, "MethodNotAllowedError")
    assert reply.headers["allow"] == "POST"
    assert "GET" in error["message"]


def test_post_ping_is_405_with_allow_header(client: httpx.Client) -> None:
    reply = client.post("/ping", json={})

    assert_error(reply, 405, "MethodNotAllowedError")
    assert reply.headers["allow"] == "GET, HEAD"


def test_server_keeps_serving_after_a_burst_of_bad_requests(client: httpx.Client) -> None:
    bodies = [b"{", b"\xff", b"[" * 1000, b"", b"[]", b"1"]
    statuses = [post_raw(client, body).status_code for body in bodies]
    reply = client.post("/invocations", json={"query": "still here"})

    assert statuses == [400] * len(bodies)
    assert reply.status_code == 200
    assert reply.json()["result"]["response"] == "Processed: still here"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json; charset=utf-8", b'{"query": "x"}'),
        ("APPLICATION/JSON", b'{"query": "x"}'),
        ("application/vnd.example+json", b'{"query": "x"}'),
        ("application/x-msgpack", b"\x81\xa5query\xa1x"),
        ("application/msgpack; v=1", b"\x81\xa5query\xa1x"),
    ],
)
def test_json_and_msgpack_content_type_variants_are_accepted(
    client: httpx.Client, content_type: str, body: bytes
) -> None:
    reply = post_raw(client, body, content_type=content_type)

    assert reply.status_code == 200, reply.text
    assert reply.json()["result"]["response"] == "Processed: x"


@pytest.mark.parametrize(
    "body", [b"\x91" * 100_000, b"\x81\xa1a" * 100_000], ids=["arrays", "maps"]
)
def test_deeply_nested_msgpack_is_400(client: httpx.Client, body: bytes) -> None:
    reply = post_raw(client, body, content_type="application/msgpack")

    error = assert_error(reply, 400, "ValidationError")
    assert "nested too deeply" in error["message"]
