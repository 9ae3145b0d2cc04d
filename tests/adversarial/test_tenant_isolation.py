"""Tenant isolation: every endpoint, called with another tenant's ids.

Three tenants: ``alpha`` and ``beta`` with Bearer keys, ``gamma`` signing its
requests (HMAC). Each owns a live, a paused and a closed session and an
uploaded template. Every tenant then calls every endpoint with every other
tenant's ids, and with an id that exists nowhere: the two answers must be the
same 404 (same status, error type, and message once the id is blanked out),
so nothing tells a caller that another tenant's resource exists; and after
the whole matrix every tenant's resources are exactly as it left them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from .conftest import Server, agent_archive, serve
from .raw import Reply

pytestmark = pytest.mark.anyio

TENANTS = ("alpha", "beta", "gamma")
NEVER = "never-existed-7"

# (method, path, body): every endpoint that takes an id, with a body it accepts.
SESSION_ENDPOINTS: list[tuple[str, str, bytes]] = [
    ("GET", "/v1/sessions/{}", b""),
    ("DELETE", "/v1/sessions/{}", b""),
    ("POST", "/v1/sessions/{}/pause", b""),
    ("POST", "/v1/sessions/{}/resume", b""),
    ("POST", "/v1/sessions/{}/timeout", b'{"timeout_seconds": 5}'),
    ("PUT", "/v1/sessions/{}/timeout", b'{"timeout_seconds": 5}'),
    ("GET", "/v1/sessions/{}/ping", b""),
    ("POST", "/v1/sessions/{}/invocations", b'{"prompt": "steal"}'),
]
TEMPLATE_ENDPOINTS: list[tuple[str, str, bytes]] = [
    ("GET", "/v1/templates/{}", b""),
    ("DELETE", "/v1/templates/{}", b""),
    ("POST", "/v1/agents/{}/invocations", b'{"prompt": "steal"}'),
]
HEADER_VARIANTS: list[list[tuple[str, str]]] = [
    [],
    [("idempotency-key", "k-1"), ("last-event-id", "1")],  # resume someone else's stream
    [("accept", "application/msgpack")],
]


def owned(tenant: str) -> dict[str, str]:
    return {
        "live": f"{tenant}-live",
        "paused": f"{tenant}-paused",
        "closed": f"{tenant}-closed",
        "template": f"{tenant}-tpl",
        "name": f"{tenant}-agent",
    }


def shape(reply: Reply, ident: str) -> tuple[int, str | None, str]:
    """Status, error type and message with the id blanked out."""
    if reply.header("content-type") == "application/msgpack":
        import msgspec

        body: Any = msgspec.msgpack.decode(reply.body)
    else:
        body = json.loads(reply.body) if reply.body else {}
    error = body.get("error", {}) if isinstance(body, dict) else {}
    message = str(error.get("message", "")).replace(ident, "{id}")
    return reply.status, error.get("type"), message


async def setup_tenant(server: Server, tenant: str) -> None:
    ids = owned(tenant)
    for sid in (ids["live"], ids["paused"], ids["closed"]):
        body = json.dumps({"template_id": "fuzz", "session_id": sid, "metadata": {"t": tenant}})
        reply = await server.call(tenant, "POST", "/v1/sessions", body.encode())
        assert reply.status == 201, reply
    reply = await server.call(tenant, "POST", f"/v1/sessions/{ids['live']}/invocations", b"{}")
    assert reply.status == 200, reply
    assert (await server.call(tenant, "POST", f"/v1/sessions/{ids['paused']}/pause")).status == 200
    assert (await server.call(tenant, "DELETE", f"/v1/sessions/{ids['closed']}")).status == 200
    archive = agent_archive(ids["name"], template_id=ids["template"])
    reply = await server.call(
        tenant, "POST", "/v1/templates", archive, content_type="application/gzip"
    )
    assert reply.status == 202, reply


async def snapshot(server: Server, tenant: str) -> dict[str, Any]:
    """What the tenant sees of its own resources (the volatile build fields left out)."""
    ids = owned(tenant)
    seen: dict[str, Any] = {}
    for key in ("live", "paused", "closed"):
        reply = await server.call(tenant, "GET", f"/v1/sessions/{ids[key]}")
        seen[key] = (reply.status, json.loads(reply.body))
    reply = await server.call(tenant, "GET", f"/v1/templates/{ids['template']}")
    template = json.loads(reply.body)
    seen["template"] = (reply.status, template.get("template_id"), template.get("digest"))
    listed = json.loads((await server.call(tenant, "GET", "/v1/sessions")).body)["sessions"]
    seen["sessions"] = sorted(s["session_id"] for s in listed)
    templates = json.loads((await server.call(tenant, "GET", "/v1/templates")).body)["templates"]
    seen["templates"] = sorted(t["template_id"] for t in templates)
    return seen


async def test_no_endpoint_reveals_or_touches_another_tenants_resources(tmp_path: Path) -> None:
    async with serve(tmp_path) as server:
        for tenant in TENANTS:
            await setup_tenant(server, tenant)
        before = {tenant: await snapshot(server, tenant) for tenant in TENANTS}
        assert before["alpha"]["live"][1]["turns"]["ok"] == 1
        assert before["alpha"]["paused"][1]["status"] == "paused"
        assert before["alpha"]["closed"][0] == 404
        assert before["beta"]["sessions"] == ["beta-live", "beta-paused"]
        assert "beta-tpl" in before["beta"]["templates"]
        assert not {"alpha-tpl", "gamma-tpl"} & set(before["beta"]["templates"])

        checked = 0
        for attacker in TENANTS:
            for victim in (t for t in TENANTS if t != attacker):
                theirs = owned(victim)
                cases = [
                    (endpoint, theirs[key])
                    for endpoint in SESSION_ENDPOINTS
                    for key in ("live", "paused", "closed")
                ]
                cases += [
                    (endpoint, theirs[key])
                    for endpoint in TEMPLATE_ENDPOINTS
                    for key in ("template", "name")
                ]
                for (method, path, body), ident in cases:
                    variants = HEADER_VARIANTS if path.endswith("/invocations") else [[]]
                    for headers in variants:
                        got = await server.call(
                            attacker, method, path.format(ident), body, headers=headers
                        )
                        control = await server.call(
                            attacker, method, path.format(NEVER), body, headers=headers
                        )
                        where = f"{attacker} {method} {path.format(ident)} {headers}"
                        assert got.status == 404, (where, got)
                        assert shape(got, ident) == shape(control, NEVER), (where, got, control)
                        checked += 1
        assert checked == 6 * (7 * 3 + 3 * 3 + 2 * 2 + 2 * 3)

        after = {tenant: await snapshot(server, tenant) for tenant in TENANTS}
        assert after == before
        await server.ping()


async def test_another_tenants_session_id_names_a_session_of_ones_own(tmp_path: Path) -> None:
    """Naming beta's session creates or reaches alpha's own, and leaves beta's alone."""
    async with serve(tmp_path) as server:
        for tenant in ("alpha", "beta"):
            await setup_tenant(server, tenant)
        before = await snapshot(server, "beta")

        reply = await server.call(
            "alpha", "POST", "/v1/sessions", b'{"template_id": "fuzz", "session_id": "beta-live"}'
        )
        assert reply.status == 201, reply
        assert json.loads(reply.body)["turns"]["ok"] == 0  # a fresh one, alpha's
        for sid in ("beta-live", "beta-paused", "beta-closed"):
            reply = await server.call(
                "alpha",
                "POST",
                "/v1/agents/fuzz/invocations",
                b'{"prompt": "mine"}',
                headers=[("x-ppio-session-id", sid)],
            )
            assert reply.status == 200, reply
            result = json.loads(reply.body)["result"]
            assert result["turn"] == 1, result  # alpha's own session, its first turn
        listed = json.loads((await server.call("alpha", "GET", "/v1/sessions")).body)["sessions"]
        assert sorted(s["session_id"] for s in listed) == [
            "alpha-live",
            "alpha-paused",
            "beta-closed",
            "beta-live",
            "beta-paused",
        ]
        assert all(s["metadata"] != {"t": "beta"} for s in listed)

        assert await snapshot(server, "beta") == before


async def _wait_built(server: Server, tenant: str, template_id: str) -> None:
    with anyio.fail_after(60):
        while True:
            reply = await server.call(tenant, "GET", f"/v1/templates/{template_id}")
            if json.loads(reply.body)["phase"] not in ("pending", "building"):
                return
            await anyio.sleep(0.1)


async def test_uploading_another_tenants_explicit_template_id_reveals_nothing(
    tmp_path: Path,
) -> None:
    """Explicit template ids name templates within a tenant: beta's ``shared-id``
    neither blocks alpha's nor is touched by it, and each tenant runs its own."""
    async with serve(tmp_path) as server:
        for tenant in ("beta", "alpha"):
            archive = agent_archive(f"{tenant}-agent", template_id="shared-id")
            reply = await server.call(
                tenant, "POST", "/v1/templates", archive, content_type="application/gzip"
            )
            assert reply.status == 202, reply
            assert json.loads(reply.body)["template_id"] == "shared-id"
        seen = {}
        for tenant in ("alpha", "beta"):
            await _wait_built(server, tenant, "shared-id")
            reply = await server.call(tenant, "GET", "/v1/templates/shared-id")
            template = json.loads(reply.body)
            assert (template["name"], template["phase"]) == (f"{tenant}-agent", "deployed")
            seen[tenant] = template["digest"]
            path = "/v1/agents/shared-id/invocations"
            reply = await server.call(tenant, "POST", path, b'{"n": 1}')
            assert reply.status == 200, reply
        assert seen["alpha"] != seen["beta"]

        assert (await server.call("alpha", "DELETE", "/v1/templates/shared-id")).status == 200
        gone = await server.call("alpha", "GET", "/v1/templates/shared-id")
        kept = await server.call("beta", "GET", "/v1/templates/shared-id")
        ran = await server.call("beta", "POST", "/v1/agents/shared-id/invocations", b"{}")
    # Checked once the server has stopped (a failure inside would stop it by force).
    assert gone.status == 404, gone
    assert kept.status == 200, kept
    assert json.loads(kept.body)["digest"] == seen["beta"]
    assert ran.status == 200, ran


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_deleting_a_template_spares_another_tenants_sessions(tmp_path: Path) -> None:
    async with serve(tmp_path) as server:
        archive = agent_archive("same-agent")  # identical content: one id for both tenants
        ids = []
        for tenant in ("alpha", "beta"):
            reply = await server.call(
                tenant, "POST", "/v1/templates", archive, content_type="application/gzip"
            )
            assert reply.status == 202, reply
            ids.append(json.loads(reply.body)["template_id"])
        assert ids[0] == ids[1]
        await _wait_built(server, "beta", ids[1])
        body = json.dumps({"template_id": ids[1], "session_id": "beta-s"}).encode()
        assert (await server.call("beta", "POST", "/v1/sessions", body)).status == 201

        assert (await server.call("alpha", "DELETE", f"/v1/templates/{ids[0]}")).status == 200

        reply = await server.call("beta", "GET", "/v1/sessions/beta-s")
    assert reply.status == 200, reply
