"""What the fuzzing found, pinned as explicit cases.

JSON integers outside msgpack's range (``-2**63 .. 2**64-1``) were accepted:
a reply asked for as msgpack then failed with a bare 500 (an echoing agent's
reply; a session whose ``metadata`` held one, on ``POST /v1/sessions`` and on
every later ``GET /v1/sessions`` of that tenant), and the session
checkpoints could no longer be written. They are now a 400 at the edge that
names the field.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import msgspec
import pytest

from ppio_sandbox.agent_runtime.errors import ValidationError
from ppio_sandbox.agent_runtime.protocol import decode_json, decode_msgpack, decode_payload

from .conftest import serve
from .raw import build_request, connect, exchange, read_reply

MSGPACK = [("accept", "application/msgpack")]


@pytest.mark.parametrize(
    ("body", "where"),
    [
        (b'{"n": 18446744073709551616}', "n"),
        (b'{"n": -9223372036854775809}', "n"),
        (b'{"template_id": "fuzz", "timeout_seconds": 1' + b"0" * 400 + b"}", "timeout_seconds"),
        (b'{"data": {"xs": [1, 2, 100000000000000000000000]}}', "data.xs[2]"),
        (b'{"a": ' + b"[" * 500 + b"1" * 30 + b"]" * 500 + b"}", "a" + "[0]" * 66),
    ],
)
def test_integers_msgpack_cannot_carry_are_refused_naming_where(body: bytes, where: str) -> None:
    with pytest.raises(ValidationError, match="outside -2\\*\\*63") as raised:
        decode_payload(decode_json, body)
    assert raised.value.message.startswith(where)


@pytest.mark.parametrize(
    "body",
    [
        b'{"n": 18446744073709551615}',  # 2**64 - 1
        b'{"n": -9223372036854775808}',  # -2**63
        b'{"n": "123456789012345678901234567890"}',  # long digits in a string
        b'{"n": 1.2345678901234567890123e300}',
    ],
)
def test_everything_msgpack_can_carry_is_accepted(body: bytes) -> None:
    payload = decode_payload(decode_json, body)
    assert decode_msgpack(msgspec.msgpack.encode(payload)) == payload


@pytest.mark.anyio
async def test_huge_integers_are_a_400_not_a_500(tmp_path: Path) -> None:
    async with serve(tmp_path) as server:
        created = await server.call(
            "alpha", "POST", "/v1/sessions", b'{"template_id": "fuzz", "session_id": "s1"}'
        )
        assert created.status == 201, created
        # The fuzzing's first find: an echoing agent, a huge int, a msgpack reply.
        reply = await server.call(
            "alpha",
            "POST",
            "/v1/sessions/s1/invocations",
            b'{"prompt": "x", "n": 1' + b"0" * 30 + b"}",
            headers=MSGPACK,
        )
        assert reply.status == 400, reply
        assert msgspec.msgpack.decode(reply.body)["error"]["message"].startswith("n is an integer")
        # The second: session metadata, which every later listing showed.
        reply = await server.call(
            "alpha",
            "POST",
            "/v1/sessions",
            b'{"template_id": "fuzz", "metadata": {"n": 18446744073709551616}}',
            headers=MSGPACK,
        )
        assert reply.status == 400, reply
        listed = await server.call("alpha", "GET", "/v1/sessions", headers=MSGPACK)
        assert listed.status == 200, listed
        assert [s["session_id"] for s in msgspec.msgpack.decode(listed.body)["sessions"]] == ["s1"]
        # What msgpack can carry still goes through, both ways.
        reply = await server.call(
            "alpha",
            "POST",
            "/v1/sessions/s1/invocations",
            b'{"prompt": "x", "n": 18446744073709551615}',
            headers=MSGPACK,
        )
        assert reply.status == 200, reply
        assert msgspec.msgpack.decode(reply.body)["result"]["echo"]["n"] == 2**64 - 1
        reply = await server.call(
            "alpha", "POST", "/v1/sessions/s1/invocations", b'{"n": -9223372036854775808}'
        )
        assert json.loads(reply.body)["result"]["echo"]["n"] == -(2**63)


@pytest.mark.anyio
async def test_the_fuzzings_falsifying_example(tmp_path: Path) -> None:
    """Hypothesis's shrunk example, byte for byte: it was a bare 500."""
    async with serve(tmp_path) as server:
        await server.call(
            "alpha", "POST", "/v1/sessions", b'{"template_id": "fuzz", "session_id": "fz"}'
        )
        request = build_request(
            "POST",
            "/v1/sessions/fz/invocations",
            [("accept", "application/msgpack"), ("authorization", "Bearer secret-alpha")],
            b'{"template_id":-9223372036854775809,"timeout_seconds":"fuzz"}',
            chunked=True,
        )
        reply = await exchange(server.target, request)
        assert reply.status == 400, reply
        message = msgspec.msgpack.decode(reply.body)["error"]["message"]
        assert message.startswith("template_id is an integer outside"), message


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/nope", "//v1//templates"])
async def test_a_client_that_stops_mid_body_cannot_break_a_connections_writes(
    tmp_path: Path, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Found on trio: two tasks wrote one closing connection at once (BusyResourceError).

    The reply to a path outside /v1 goes out before the body is read; the
    client declared 5 bytes, sent 4 and closed its side, so hypercorn's
    reader wrote its own 400 while the reply was being written and the
    connection closed. In the reader's task the error stopped the server.
    """
    async with serve(tmp_path) as server:
        for _ in range(100):
            request = build_request(
                "GET", path, [("authorization", "Bearer secret-alpha")], b"null"
            )
            request = request.replace(b"content-length: 4", b"content-length: 5")
            async with await connect(server.target) as stream:
                await stream.send(request)
                await stream.send_eof()
                with contextlib.suppress(EOFError):
                    await read_reply(stream)
        await server.ping()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
