"""One ``serve`` subprocess with API keys, over TCP: AgentCore, HMAC, tenancy, bad bodies, metrics.

The server (one per module) hosts two templates registered at start-up:
``agentcore-e2e``, a ``BedrockAgentCoreApp`` run as a process sandbox by its
``spec.sandbox.command``, and ``worker-inprocess``. Two tenants hold a key
each. Every request is authenticated: Bearer with the key's secret, or
signed with :func:`ppio_sandbox.agent_runtime.signing.sign_request`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from ppio_sandbox.agent_runtime.signing import sign_request
from ppio_sandbox.orchestrator.templates import content_hash, pack_directory
from tests.e2e.test_orchestrator_serve import (
    TEMPLATES,
    ServeProcess,
    descendants,
    read_proc,
    serving,
    template_args,
)


@dataclass(frozen=True)
class Key:
    tenant: str
    key_id: str
    secret: str

    @property
    def spec(self) -> str:
        return f"{self.tenant}:{self.key_id}:{self.secret}"

    @property
    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}


ACME = Key("acme", "acme-key", "acme-secret-3f9a1c07d2")
GLOBEX = Key("globex", "globex-key", "globex-secret-81be55e4a0")
JSON = "application/json"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    work = tmp_path_factory.mktemp("api")
    args = [*template_args("agentcore", "worker_inprocess")]
    args += ["--api-key", ACME.spec, "--api-key", GLOBEX.spec]
    with serving(work, *args, data_dir=work / "data", tcp="127.0.0.1") as running:
        yield running


@pytest.fixture
def acme(server: ServeProcess) -> Iterator[httpx.Client]:
    with server.client(headers=ACME.bearer) as client:
        yield client


@pytest.fixture
def globex(server: ServeProcess) -> Iterator[httpx.Client]:
    with server.client(headers=GLOBEX.bearer) as client:
        yield client


@pytest.fixture
def anonymous(server: ServeProcess) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def error_of(response: httpx.Response, status: int, error_type: str) -> str:
    """Check an error envelope exactly; return its message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == JSON
    body = response.json()
    assert list(body) == ["error"], body
    assert {"type", "message", "request_id"} <= set(body["error"]), body
    assert set(body["error"]) <= {"type", "message", "request_id", "details"}, body
    assert body["error"]["type"] == error_type, body
    message = body["error"]["message"]
    assert isinstance(message, str), body
    assert message, body
    return message


def session_ids(client: httpx.Client) -> set[str]:
    r = client.get("/v1/sessions")
    assert r.status_code == 200, r.text
    return {s["session_id"] for s in r.json()["sessions"]}


def new_session(client: httpx.Client, template: str = "worker-inprocess", **body: Any) -> str:
    r = client.post("/v1/sessions", json={"template_id": template, **body})
    assert r.status_code == 201, r.text
    return str(r.json()["session_id"])


# -- a BedrockAgentCoreApp hosted by its own command ---------------------------------------------


def test_bedrock_agentcore_app_runs_as_a_command_sandbox(acme: httpx.Client) -> None:
    r = acme.get("/v1/templates/agentcore-e2e")  # a bare name resolves to the deployed id
    assert r.status_code == 200, r.text
    template = r.json()
    assert template["template_id"].startswith("agentcore-e2e-")
    assert template["phase"] == "deployed"
    assert template["spec"]["sandbox"]["kind"] == "process"
    assert template["spec"]["sandbox"]["command"] == ["python", "agent.py"]

    r = acme.post("/v1/sessions", json={"template_id": "agentcore-e2e"})
    assert r.status_code == 201, r.text
    sid, pid = r.json()["session_id"], r.json()["sandbox"]["pid"]
    proc = read_proc(pid)
    assert proc is not None
    below = [proc, *descendants(pid).values()]  # bwrap, its init, the command
    commands = [p.cmdline for p in below]
    assert ("python", "agent.py") in commands  # the command ran, not the PPIO runtime
    assert not any("ppio_sandbox.agent_runtime" in c for c in commands)

    r = acme.post(f"/v1/sessions/{sid}/invocations", json={"prompt": "what is 6 x 7?"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "success"
    agent_pid = body["result"]["pid"]  # in the sandbox's own pid namespace, if walled
    assert body["result"] == {
        "answer": "agentcore says: what is 6 x 7?",
        "session_id": sid,
        "pid": agent_pid,
    }
    assert body["metadata"]["session_id"] == sid

    # The AgentCore-style route reaches the same session by its runtime session id.
    r = acme.post(
        "/v1/agents/agentcore-e2e/invocations",
        json={"prompt": "again"},
        headers={"X-Amzn-Bedrock-AgentCore-Runtime-Session-Id": sid},
    )
    assert r.status_code == 200, r.text
    assert r.json()["result"] == {
        "answer": "agentcore says: again",
        "session_id": sid,
        "pid": agent_pid,
    }

    assert acme.delete(f"/v1/sessions/{sid}").status_code == 200
    deadline = time.monotonic() + 10
    while (now := read_proc(pid)) is not None and now.start == proc.start and now.state != "Z":
        assert time.monotonic() < deadline, f"sandbox {pid} still alive after close"
        time.sleep(0.02)


# -- HMAC end to end ------------------------------------------------------------------------------


def signed(
    server: ServeProcess,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    key: Key = ACME,
    query: str = "",
    content_type: str | None = JSON,
    **sign_options: Any,
) -> httpx.Request:
    """A request signed as the client SDK signs it, ready for ``client.send``."""
    headers = {"Host": server.host_header}
    if content_type is not None:
        headers["Content-Type"] = content_type
    added = sign_request(
        method,
        path,
        query,
        headers,
        body,
        access_key=key.key_id,
        secret=key.secret,
        **sign_options,
    )
    url = server.base_url + path + (f"?{query}" if query else "")
    return httpx.Request(method, url, content=body, headers={**headers, **added})


def as_json(value: Any) -> bytes:
    return json.dumps(value).encode()


def test_hmac_signed_requests_are_accepted_as_the_keys_tenant(
    server: ServeProcess, acme: httpx.Client, anonymous: httpx.Client
) -> None:
    create = as_json({"template_id": "worker-inprocess", "metadata": {"via": "hmac"}})
    r = anonymous.send(signed(server, "POST", "/v1/sessions", create))
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    assert r.json()["metadata"] == {"via": "hmac"}

    r = anonymous.send(
        signed(server, "GET", f"/v1/sessions/{sid}", query="b=2&a=1", content_type=None)
    )
    assert r.status_code == 200, r.text
    assert r.json()["session_id"] == sid

    invoke = as_json({"prompt": "signed turn"})
    r = anonymous.send(signed(server, "POST", f"/v1/sessions/{sid}/invocations", invoke))
    assert r.status_code == 200, r.text
    assert r.json()["result"]["echo"] == "signed turn"
    assert r.json()["result"]["session_id"] == sid

    # The same tenant with its Bearer secret sees the session made by a signature.
    assert sid in session_ids(acme)
    error_of(anonymous.get(f"/v1/sessions/{sid}"), 401, "AuthenticationError")
    assert acme.delete(f"/v1/sessions/{sid}").status_code == 200


def test_a_replayed_signed_request_is_refused_for_its_nonce(
    server: ServeProcess, acme: httpx.Client, anonymous: httpx.Client
) -> None:
    before = session_ids(acme)
    request = signed(server, "POST", "/v1/sessions", as_json({"template_id": "worker-inprocess"}))
    first = anonymous.send(request)
    assert first.status_code == 201, first.text
    replay = anonymous.send(request)
    message = error_of(replay, 401, "AuthenticationError")
    assert message == "nonce already used: a signed request cannot be replayed"
    assert session_ids(acme) - before == {first.json()["session_id"]}  # exactly one made
    assert acme.delete(f"/v1/sessions/{first.json()['session_id']}").status_code == 200


def test_tampered_or_badly_signed_requests_are_refused(
    server: ServeProcess, acme: httpx.Client, anonymous: httpx.Client
) -> None:
    before = session_ids(acme)
    original = as_json({"template_id": "worker-inprocess", "metadata": {"n": 1}})
    tampered = as_json({"template_id": "worker-inprocess", "metadata": {"n": 2}})

    request = signed(server, "POST", "/v1/sessions", original)
    forged = httpx.Request("POST", request.url, content=tampered, headers=request.headers)
    forged.headers["Content-Length"] = str(len(tampered))
    message = error_of(anonymous.send(forged), 401, "AuthenticationError")
    assert message == "X-PPIO-Content-SHA256 does not match the body's SHA-256"

    # Recomputing the body hash does not help: it is part of what was signed.
    forged.headers["X-PPIO-Content-SHA256"] = hashlib.sha256(tampered).hexdigest()
    message = error_of(anonymous.send(forged), 401, "AuthenticationError")
    assert message.startswith("signature does not match for key 'acme-key'")

    wrong_secret = Key(ACME.tenant, ACME.key_id, "not-the-secret")
    r = anonymous.send(signed(server, "POST", "/v1/sessions", original, key=wrong_secret))
    assert error_of(r, 401, "AuthenticationError").startswith("signature does not match")

    stale = signed(server, "POST", "/v1/sessions", original, timestamp=int(time.time()) - 3600)
    message = error_of(anonymous.send(stale), 401, "AuthenticationError")
    assert "behind the server clock" in message

    assert session_ids(acme) == before  # none of them did anything


def test_bearer_secret_works_and_tenants_cannot_see_each_others_sessions(
    server: ServeProcess, acme: httpx.Client, globex: httpx.Client
) -> None:
    sid = new_session(acme)
    assert acme.post(f"/v1/sessions/{sid}/invocations", json={"prompt": 1}).status_code == 200

    assert sid not in session_ids(globex)
    for response in (
        globex.get(f"/v1/sessions/{sid}"),
        globex.post(f"/v1/sessions/{sid}/invocations", json={"prompt": "steal"}),
        globex.post(f"/v1/sessions/{sid}/pause"),
        globex.delete(f"/v1/sessions/{sid}"),
    ):
        assert error_of(response, 404, "SessionNotFoundError") == f"session {sid} not found"
    # Session ids are per tenant: naming acme's id starts a session of globex's own.
    own = globex.post(
        "/v1/agents/worker-inprocess/invocations",
        json={"prompt": "steal"},
        headers={"X-PPIO-Session-Id": sid},
    )
    assert own.status_code == 200, own.text
    assert own.json()["metadata"]["session_id"] == sid
    assert globex.delete(f"/v1/sessions/{sid}").status_code == 200
    with server.client() as client:
        signed_get = signed(server, "GET", f"/v1/sessions/{sid}", key=GLOBEX, content_type=None)
        error_of(client.send(signed_get), 404, "SessionNotFoundError")

    # The owner's session is untouched: still ready, one turn, never paused.
    view = acme.get(f"/v1/sessions/{sid}").json()
    assert view["status"] == "ready"
    assert view["turns"] == {"ok": 1, "failed": 0, "queued": 0}

    with server.client(headers={"Authorization": f"Bearer {ACME.key_id}"}) as by_key_id:
        assert error_of(by_key_id.get("/v1/sessions"), 401, "AuthenticationError") == (
            "unknown API key"
        )
    assert acme.delete(f"/v1/sessions/{sid}").status_code == 200


def test_a_signed_template_upload_is_private_to_its_tenant(
    server: ServeProcess,
    acme: httpx.Client,
    globex: httpx.Client,
    anonymous: httpx.Client,
    tmp_path: Path,
) -> None:
    src = tmp_path / "agent"
    shutil.copytree(TEMPLATES / "worker_inprocess", src)
    (src / "agent.py").write_text((src / "agent.py").read_text() + "# acme's own copy\n")
    archive = pack_directory(src)
    r = anonymous.send(
        signed(server, "POST", "/v1/templates", archive, content_type="application/gzip")
    )
    assert r.status_code == 202, r.text
    template_id = r.json()["template_id"]
    assert template_id == f"worker-inprocess-{content_hash(archive)[:8]}"

    deadline = time.monotonic() + 30
    while (view := acme.get(f"/v1/templates/{template_id}").json())["phase"] != "deployed":
        assert view["phase"] in ("pending", "building"), view
        assert time.monotonic() < deadline, view
        time.sleep(0.02)

    acme_ids = {t["template_id"] for t in acme.get("/v1/templates").json()["templates"]}
    globex_ids = {t["template_id"] for t in globex.get("/v1/templates").json()["templates"]}
    assert template_id in acme_ids
    assert template_id not in globex_ids
    assert acme_ids - globex_ids == {template_id}  # the rest are shared start-up templates
    error_of(globex.get(f"/v1/templates/{template_id}"), 404, "TemplateNotFoundError")
    r = globex.post("/v1/sessions", json={"template_id": template_id})
    error_of(r, 404, "TemplateNotFoundError")
    error_of(globex.delete(f"/v1/templates/{template_id}"), 404, "TemplateNotFoundError")
    assert acme.delete(f"/v1/templates/{template_id}").status_code == 200


# -- malformed bodies on the management API: 4xx envelopes, never 500 ---------------------------

DEEP = b"[" * 100_000 + b"]" * 100_000
W = "worker-inprocess"


def bad(
    body: Any, message: str, status: int = 400, error_type: str = "ValidationError", **kw: Any
) -> Any:
    """One malformed creation: ``body`` (bytes as sent, else JSON-encoded) and its answer."""
    data = body if isinstance(body, bytes) else as_json(body)
    return pytest.param(data, kw.get("ctype", JSON), status, error_type, message, id=kw["id"])


BAD_CREATES = [
    bad(b'{"template_id":', "malformed body: ", id="truncated"),
    bad(b"{'template_id': 'x'}", "malformed body: ", id="single-quotes"),
    bad(b"\xff\xfe", "malformed body: ", id="not-utf8"),
    bad(b"", "empty body; ", id="empty"),
    bad(DEEP, "body is nested too deeply", id="deep"),
    bad(b"[1, 2]", "body must be a JSON object", id="list"),
    bad(b"\xc1", "malformed body: ", ctype="application/msgpack", id="msgpack"),
    bad(
        {"template_id": W},
        "unsupported Content-Type 'text/plain'",
        415,
        "UnsupportedMediaTypeError",
        ctype="text/plain",
        id="text-plain",
    ),
    bad({}, "template_id is required", id="no-template"),
    bad({"template_id": 5}, "template_id is required", id="template-int"),
    bad({"template_id": ""}, "template_id is required", id="template-empty"),
    bad(
        {"template_id": W, "timeout_seconds": "10"}, "timeout_seconds must be a number", id="t-str"
    ),
    bad(
        {"template_id": W, "timeout_seconds": True}, "timeout_seconds must be a number", id="t-bool"
    ),
    bad(
        {"template_id": W, "timeout_seconds": [6]}, "timeout_seconds must be a number", id="t-list"
    ),
    bad(
        {"template_id": W, "timeout_seconds": -1},
        "timeout_seconds must be a number of seconds greater than 0",
        id="t-neg",
    ),
    bad(
        {"template_id": W, "timeout_seconds": 0},
        "timeout_seconds must be a number of seconds greater than 0",
        id="t-zero",
    ),
    bad(b'{"template_id": "x", "timeout_seconds": 1e999}', "malformed body: ", id="t-overflow"),
    bad({"template_id": W, "env_vars": ["A=1"]}, "env_vars must be an object", id="env-list"),
    bad({"template_id": W, "env_vars": "A=1"}, "env_vars must be an object", id="env-str"),
    bad({"template_id": W, "env_vars": {"A": 1}}, "env_vars must be an object", id="env-int"),
    bad({"template_id": W, "metadata": "x"}, "metadata must be an object", id="metadata-str"),
    bad({"template_id": W, "session_id": 5}, "session_id must be 1-128 characters", id="sid-int"),
    bad(
        {"template_id": "no-such-agent"},
        "no template or agent named 'no-such-agent'",
        404,
        "TemplateNotFoundError",
        id="unknown-template",
    ),
]


@pytest.mark.parametrize(("body", "ctype", "status", "error_type", "message"), BAD_CREATES)
def test_malformed_session_creation_is_a_4xx_envelope(
    acme: httpx.Client, body: bytes, ctype: str, status: int, error_type: str, message: str
) -> None:
    before = session_ids(acme)
    r = acme.post("/v1/sessions", content=body, headers={"Content-Type": ctype})
    assert error_of(r, status, error_type).startswith(message)
    assert session_ids(acme) == before


@pytest.mark.parametrize(
    ("field", "value"),
    [("env_vars", []), ("env_vars", ""), ("metadata", []), ("metadata", False)],
    ids=["env-list", "env-str", "metadata-list", "metadata-false"],
)
def test_falsy_values_of_the_wrong_type_are_refused_too(
    acme: httpx.Client, field: str, value: Any
) -> None:
    r = acme.post("/v1/sessions", json={"template_id": W, field: value})
    if r.status_code == 201:
        acme.delete(f"/v1/sessions/{r.json()['session_id']}")
    error_of(r, 400, "ValidationError")


@pytest.mark.parametrize(
    "env_vars",
    [{"PPIO_AGENT_BIND": "unix:/tmp/x"}, {"1BAD": "x"}, {"A=B": "x"}, {"NUL": "a\u0000b"}],
    ids=["reserved", "digit-first", "equals-sign", "nul-value"],
)
def test_invalid_env_var_names_for_a_process_template_are_a_clear_400(
    acme: httpx.Client, env_vars: dict[str, str]
) -> None:
    before = session_ids(acme)
    r = acme.post("/v1/sessions", json={"template_id": "agentcore-e2e", "env_vars": env_vars})
    assert r.status_code != 500
    message = error_of(r, 400, "ValidationError")
    assert session_ids(acme) == before
    assert "env_vars" in message, message
    assert "internal error" not in message, message


def test_a_session_id_with_a_slash_is_refused_or_reachable(acme: httpx.Client) -> None:
    r = acme.post("/v1/sessions", json={"template_id": W, "session_id": "team/a"})
    if r.status_code == 400:
        return  # refusing such ids is a fine answer too
    assert r.status_code == 201, r.text
    try:
        assert acme.get(f"/v1/sessions/{quote('team/a', safe='')}").status_code == 200
    finally:
        acme.delete(f"/v1/sessions/{quote('team/a', safe='')}")
        acme.delete("/v1/sessions/team/a")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "malformed body: "),
        (as_json({"timeout_seconds": "60"}), "timeout_seconds must be a number"),
        (as_json({"timeout_seconds": None}), "timeout_seconds must be a number"),
        (
            as_json({"timeout_seconds": -5}),
            "timeout_seconds must be a number of seconds greater than 0",
        ),
        (as_json([60]), "body must be a JSON object"),
    ],
    ids=["garbage", "str", "null", "negative", "list"],
)
def test_malformed_timeout_updates_are_400(acme: httpx.Client, body: bytes, message: str) -> None:
    sid = new_session(acme)
    try:
        r = acme.post(f"/v1/sessions/{sid}/timeout", content=body, headers={"Content-Type": JSON})
        assert error_of(r, 400, "ValidationError").startswith(message)
        assert acme.get(f"/v1/sessions/{sid}").json()["timeout_seconds"] == 900.0
    finally:
        acme.delete(f"/v1/sessions/{sid}")


def test_malformed_invocations_are_400_and_the_session_lives_on(acme: httpx.Client) -> None:
    sid = new_session(acme)
    url = f"/v1/sessions/{sid}/invocations"
    cases = [
        (b"{", {}, "malformed body: "),
        (b"[1]", {}, "body must be a JSON object"),
        (b"{}", {"X-PPIO-Strategy": "bogus"}, "unknown strategy 'bogus'"),
        (b"{}", {"Last-Event-ID": "abc"}, "Last-Event-ID must be the integer id of an event"),
    ]
    for body, headers, message in cases:
        r = acme.post(url, content=body, headers={"Content-Type": JSON, **headers})
        assert error_of(r, 400, "ValidationError").startswith(message)
    r = acme.post(url, json={"prompt": "still here"})
    assert r.status_code == 200, r.text
    assert acme.get(f"/v1/sessions/{sid}").json()["turns"] == {"ok": 1, "failed": 0, "queued": 0}
    acme.delete(f"/v1/sessions/{sid}")


# -- /metrics -------------------------------------------------------------------------------------


def scrape(client: httpx.Client) -> tuple[dict[str, float], dict[str, str]]:
    """``/metrics`` as ({series: value}, {metric: type}), checking every line's shape."""
    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples: dict[str, float] = {}
    types: dict[str, str] = {}
    for line in r.text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif line and not line.startswith("# HELP "):
            series, value = line.rsplit(" ", 1)
            assert series not in samples, f"duplicate series {series}"
            samples[series] = float(value)
    return samples, types


def test_metrics_count_sessions_turns_durations_and_sandbox_starts(
    acme: httpx.Client, globex: httpx.Client, anonymous: httpx.Client
) -> None:
    before, types = scrape(anonymous)  # open on loopback: no credentials needed
    assert types["ppio_sessions"] == "gauge"
    assert types["ppio_turns_total"] == "counter"
    assert types["ppio_turn_duration_seconds"] == "histogram"
    assert types["ppio_sandbox_starts_total"] == "counter"

    quick, slow = new_session(acme), new_session(globex)
    agentcore = new_session(acme, "agentcore-e2e")
    turns = [
        (acme, quick, {"prompt": "a"}, 200),
        (acme, quick, {"action": "fail"}, 500),
        (globex, slow, {"action": "sleep", "seconds": 0.3}, 200),
        (acme, agentcore, {"prompt": "b"}, 200),
    ]
    for client, sid, body, status in turns:
        r = client.post(f"/v1/sessions/{sid}/invocations", json=body)
        assert r.status_code == status, r.text
    assert acme.post(f"/v1/sessions/{quick}/pause").status_code == 200

    after, _ = scrape(anonymous)

    def delta(series: str) -> float:
        return after[series] - before.get(series, 0.0)

    assert delta('ppio_sandbox_starts_total{kind="inprocess"}') == 2
    assert delta('ppio_sandbox_starts_total{kind="process"}') == 1
    assert delta('ppio_turns_total{outcome="ok"}') == 3
    assert delta('ppio_turns_total{outcome="error"}') == 1
    for outcome in ("timeout", "cancelled", "crashed"):
        assert delta(f'ppio_turns_total{{outcome="{outcome}"}}') == 0
    assert delta("ppio_turn_duration_seconds_count") == 4
    assert delta('ppio_turn_duration_seconds_bucket{le="+Inf"}') == 4
    # Only the 0.3 s sleep lies between 0.25 s and 2.5 s; the others are quick.
    assert delta('ppio_turn_duration_seconds_bucket{le="0.25"}') == 3
    assert delta('ppio_turn_duration_seconds_bucket{le="2.5"}') == 4
    assert 0.3 <= delta("ppio_turn_duration_seconds_sum") < 2.5

    # Sessions by state match what the two tenants (every session there is) see.
    views = [*acme.get("/v1/sessions").json()["sessions"]]
    views += globex.get("/v1/sessions").json()["sessions"]
    by_state: dict[str, int] = {}
    for view in views:
        by_state[view["status"]] = by_state.get(view["status"], 0) + 1
    gauges = {
        series.removeprefix('ppio_sessions{state="').removesuffix('"}'): value
        for series, value in after.items()
        if series.startswith("ppio_sessions{")
    }
    assert {state: n for state, n in gauges.items() if n} == by_state
    assert by_state.get("paused", 0) >= 1

    for client, sid in ((acme, quick), (globex, slow), (acme, agentcore)):
        assert client.delete(f"/v1/sessions/{sid}").status_code == 200
    final, _ = scrape(anonymous)
    total = sum(v for s, v in final.items() if s.startswith("ppio_sessions{"))
    assert total == len(views) - 3
