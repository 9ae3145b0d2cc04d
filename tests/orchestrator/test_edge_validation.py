"""Values from callers are checked at the edge; tenants never collide on session ids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from ppio_sandbox.agent_runtime.errors import ValidationError
from ppio_sandbox.orchestrator._validate import MAX_TIMEOUT_SECONDS, check_timeout_seconds

from .conftest import orchestrator

pytestmark = pytest.mark.anyio

HUGE = 10**400  # a JSON integer of 401 digits: float() of it overflows
KEYS = ["alpha:ka:secret-a", "beta:kb:secret-b"]


@pytest.mark.parametrize(
    "value", [HUGE, -HUGE, 0, -1, MAX_TIMEOUT_SECONDS + 1, float("nan"), float("inf"), True, "60"]
)
def test_out_of_range_timeouts_are_refused(value: Any) -> None:
    with pytest.raises(ValidationError, match="timeout_seconds"):
        check_timeout_seconds(value)


def test_timeouts_in_range_become_floats() -> None:
    assert check_timeout_seconds(1) == 1.0
    assert check_timeout_seconds(MAX_TIMEOUT_SECONDS) == MAX_TIMEOUT_SECONDS
    assert check_timeout_seconds(0.25) == 0.25


async def test_a_huge_timeout_is_400_and_leaves_nothing_behind(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o:
        body = b'{"template_id": "echo", "timeout_seconds": 1' + b"0" * 400 + b"}"
        r = await o.client.post(
            "/v1/sessions", content=body, headers={"content-type": "application/json"}
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "ValidationError"
        assert "timeout_seconds" in r.json()["error"]["message"]
        listed = await o.client.get("/v1/sessions")
        assert listed.status_code == 200
        assert listed.json()["sessions"] == []
        assert len(o.host.directory) == 0

        sid = await o.session()
        for bad in (body.replace(b'"template_id": "echo", ', b""), b'{"timeout_seconds": -5}'):
            r = await o.client.post(
                f"/v1/sessions/{sid}/timeout",
                content=bad,
                headers={"content-type": "application/json"},
            )
            assert r.status_code == 400, r.text
        # NaN and infinity can only arrive as msgpack.
        for value in (float("nan"), float("inf")):
            r = await o.client.post(
                f"/v1/sessions/{sid}/timeout",
                content=msgspec.msgpack.encode({"timeout_seconds": value}),
                headers={"content-type": "application/msgpack"},
            )
            assert r.status_code == 400, r.text
        assert (await o.client.get("/v1/sessions")).status_code == 200
        r = await o.client.post(f"/v1/sessions/{sid}/timeout", json={"timeout_seconds": 60})
        assert r.status_code == 200
        assert r.json()["timeout_seconds"] == 60


async def test_a_bad_session_id_in_the_body_is_400(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o:
        for bad in ("", "a/b", "x" * 129, 42, ["a"]):
            r = await o.client.post("/v1/sessions", json={"template_id": "echo", "session_id": bad})
            assert r.status_code == 400, (bad, r.text)
        r = await o.client.post(
            "/v1/agents/echo/invocations", json={}, headers={"X-PPIO-Session-Id": "a b"}
        )
        assert r.status_code == 400


async def test_session_ids_are_per_tenant(tmp_path: Path) -> None:
    async with (
        orchestrator(tmp_path, api_keys=KEYS, headers={"Authorization": "Bearer secret-a"}) as o,
        o.other_client(Authorization="Bearer secret-b") as beta,
    ):
        # Tenant B names chat-x first, on both routes.
        r = await beta.post(
            "/v1/agents/echo/invocations",
            json={"prompt": "b1"},
            headers={"X-PPIO-Session-Id": "chat-x"},
        )
        assert r.status_code == 200, r.text
        r = await beta.post("/v1/sessions", json={"template_id": "echo", "session_id": "s-y"})
        assert r.status_code == 201, r.text

        # Tenant A's first use of the same names is its own, fresh session.
        r = await o.client.post(
            "/v1/agents/echo/invocations",
            json={"prompt": "a1"},
            headers={"X-PPIO-Session-Id": "chat-x"},
        )
        assert r.status_code == 200, r.text
        assert r.json()["result"]["turn"] == 1
        r = await o.client.post("/v1/sessions", json={"template_id": "echo", "session_id": "s-y"})
        assert r.status_code == 201, r.text

        # Each tenant's chat-x keeps its own state.
        r = await beta.post(
            "/v1/agents/echo/invocations",
            json={"prompt": "b2"},
            headers={"X-PPIO-Session-Id": "chat-x"},
        )
        assert r.json()["result"]["turn"] == 2
        r = await o.invoke("chat-x", {"prompt": "a2"})
        assert r.json()["result"]["turn"] == 2

        # Closing one tenant's session leaves the other's alone, and the
        # tombstone tells only its own tenant why.
        assert (await beta.delete("/v1/sessions/chat-x")).status_code == 200
        r = await o.invoke("chat-x", {"prompt": "a3"})
        assert r.status_code == 200
        assert r.json()["result"]["turn"] == 3
        gone = await beta.post("/v1/sessions/chat-x/invocations", json={})
        assert gone.status_code == 404
        assert "closed by the caller" in gone.json()["error"]["message"]
        assert {s["session_id"] for s in (await beta.get("/v1/sessions")).json()["sessions"]} == {
            "s-y"
        }
        r = await beta.post("/v1/sessions", json={"template_id": "echo", "session_id": "s-y"})
        assert r.status_code == 400
        assert "already exists" in r.json()["error"]["message"]
