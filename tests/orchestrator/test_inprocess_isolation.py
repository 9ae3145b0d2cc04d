"""In-process sandboxes: an agent cannot stop the server, nor see another template's modules.

Issue 11, items 3 and 4, over HTTP against a real orchestrator on both backends:

* ``sys.exit()``, ``KeyboardInterrupt``, ``GeneratorExit`` and other
  ``BaseException`` s raised by an in-process agent -- at import, in an
  async or sync entrypoint, mid-stream, in middleware, in ``@app.ping`` --
  fail only what they ran in; cancellation still propagates.
* each template (and each version of one) imports its own sibling modules,
  without touching ``sys.path``;
* a tenant's upload runs in-process only with ``trust_uploads``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest

from ppio_sandbox.agent_runtime.sse import iter_events
from ppio_sandbox.orchestrator.cli import build_parser
from ppio_sandbox.orchestrator.host import SHARED_TENANT
from ppio_sandbox.orchestrator.templates import pack_directory

from .conftest import TEMPLATES, Running, orchestrator

pytestmark = pytest.mark.anyio

FAILURES = {
    "exit": "the agent called sys.exit(3)",
    "exit_none": "the agent called sys.exit()",
    "interrupt": "the agent raised KeyboardInterrupt: stop",
    "generator_exit": "the agent raised GeneratorExit",
    "base": "the agent raised BaseException: plain",
    "group": (
        "BaseExceptionGroup: two (the agent called sys.exit(4); the agent raised KeyboardInterrupt)"
    ),
}
"""What each ``how`` of the exit_* test agents raises, and the turn's error message."""


def events_of(text: str) -> list[Any]:
    return list(iter_events(iter(text.split("\n"))))


async def templates_by_name(o: Running) -> dict[str, Any]:
    listed = (await o.client.get("/v1/templates")).json()["templates"]
    return {t["name"]: t for t in listed}


# -- item 3: BaseExceptions fail the turn, not the server ------------------------------------------


async def test_an_agent_that_exits_at_import_fails_its_build_and_the_server_goes_on(
    tmp_path: Path,
) -> None:
    async with orchestrator(tmp_path, templates=("exit_at_import", "echo")) as o:
        failed = (await templates_by_name(o))["exit-at-import"]
        assert failed["phase"] == "failed", failed
        assert failed["error"].endswith("loading agent.py failed: the agent called sys.exit(3)")
        sid = await o.session("echo")
        r = await o.invoke(sid, {"prompt": "still serving"})
        assert r.status_code == 200, r.text
        assert r.json()["result"]["echo"] == "still serving"


@pytest.mark.parametrize("template", ["exit-async", "exit-sync"])
async def test_sys_exit_and_other_base_exceptions_fail_only_their_turn(
    tmp_path: Path, template: str
) -> None:
    # exit-sync's entrypoint, middleware and ping handler run in worker threads.
    async with orchestrator(tmp_path, templates=("exit_async", "exit_sync")) as o:
        sid = await o.session(template)
        for where in ("how", "middleware"):
            for how, message in FAILURES.items():
                r = await o.invoke(sid, {where: how})
                assert r.status_code == 500, (where, how, r.text)
                error = r.json()["error"]
                assert (error["type"], error["message"]) == ("InvocationError", message)
        ok = await o.invoke(sid, {})
        assert ok.status_code == 200, ok.text
        assert ok.json()["result"] == {"ok": True}

        # Its @app.ping handler calls sys.exit(9): the build passed, and /ping still answers.
        ping = await o.client.get(f"/v1/sessions/{sid}/ping")
        assert ping.status_code == 200, ping.text
        assert ping.json()["status"] == "Healthy"

        # Cancellation still propagates: the template's 1 s timeout stops a sleeping turn.
        slow = await o.invoke(sid, {"sleep": 3})
        assert slow.status_code == 504, slow.text
        assert slow.json()["error"]["type"] == "InvocationTimeoutError"

        view = (await o.client.get(f"/v1/sessions/{sid}")).json()
        assert view["status"] == "ready"
        assert view["turns"]["ok"] == 1
        assert view["turns"]["failed"] == 2 * len(FAILURES) + 1


@pytest.mark.parametrize("template", ["exit-agen", "exit-gen"])
async def test_a_stream_whose_agent_exits_midway_ends_with_an_error_event(
    tmp_path: Path, template: str
) -> None:
    async with orchestrator(tmp_path, templates=("exit_agen", "exit_gen")) as o:
        sid = await o.session(template)
        for how, message in FAILURES.items():
            r = await o.invoke(sid, {"how": how})
            assert r.status_code == 200, r.text
            events = events_of(r.text)
            assert [e.json() for e in events[:2]] == [{"i": 0}, {"i": 1}], (how, r.text)
            assert [e.event for e in events[2:]] == ["error"], (how, r.text)
            error = events[2].json()["error"]
            assert (error["type"], error["message"]) == ("InvocationError", message)
        r = await o.invoke(sid, {})
        assert [e.event for e in events_of(r.text)] == ["message", "message", "done"]


async def test_is_cancellation_knows_the_event_loops_cancellation_only() -> None:
    from ppio_sandbox.agent_runtime._handlers import is_cancellation

    seen: list[BaseException] = []
    with anyio.CancelScope() as scope:
        scope.cancel()
        try:
            await anyio.sleep(10)
        except BaseException as exc:
            seen.append(exc)
            raise
    assert scope.cancelled_caught
    assert is_cancellation(seen[0])
    cancelled = anyio.get_cancelled_exc_class()
    assert not is_cancellation(SystemExit(0))
    assert not is_cancellation(KeyboardInterrupt())
    assert not is_cancellation(BaseExceptionGroup("g", [SystemExit(1)]))
    assert is_cancellation(BaseExceptionGroup("g", [SystemExit(1), seen[0]]))
    assert isinstance(seen[0], cancelled)


# -- item 4: every template imports its own modules ------------------------------------------------


def expected(who: str) -> dict[str, str]:
    return {
        "helpers": f"{who}:helpers",
        "lazy_helper": f"{who}:lazy_helper",
        "pkg": f"{who}:pkg",
        "pkg.x": f"{who}:pkg.x",
        "pkg.x->helpers": f"{who}:helpers",
        "pkg.sub.deep": f"{who}:pkg.sub.deep",
    }


@pytest.mark.parametrize("order", [("iso_a", "iso_b"), ("iso_b", "iso_a")])
async def test_two_templates_each_import_their_own_sibling_modules(
    tmp_path: Path, order: tuple[str, str]
) -> None:
    path_before = list(sys.path)
    async with orchestrator(tmp_path, templates=order) as o:
        sessions = {name: await o.session(name) for name in ("iso-a", "iso-b")}
        # The template loaded second runs a turn first: its lazy imports come first.
        for name in reversed([n.replace("_", "-") for n in order]):
            r = await o.invoke(sessions[name], {"late": True})
            assert r.status_code == 200, r.text
            result = r.json()["result"]
            assert result["who"] == {**expected(name), "late": f"{name}:late"}
            assert result["module"].startswith("ppio_tpl_")
            assert result["module"].endswith(".helpers")
            # The standard library and installed packages import as usual.
            assert (result["json"], result["anyio"], result["msgspec"]) == (
                "json",
                "anyio",
                "msgspec",
            )
            assert result["roundtrip"] == {"n": 1}
        assert sys.path == path_before  # loading templates left sys.path alone
    # Nothing of the templates' leaked into the process's top-level namespace.
    for leaked in ("helpers", "lazy_helper", "late", "pkg", "agent"):
        assert leaked not in sys.modules, leaked
    assert sys.modules["json"] is json
    assert sys.modules["msgspec"] is msgspec


def rewrite(directory: Path, old: str, new: str) -> None:
    for file in directory.rglob("*.py"):
        file.write_text(file.read_text().replace(old, new))


async def test_a_redeployed_template_runs_its_new_modules_while_old_sessions_keep_theirs(
    tmp_path: Path,
) -> None:
    src = tmp_path / "redeploy"
    shutil.copytree(TEMPLATES / "iso_a", src)
    spec = src / ".ppio-agent.yaml"
    spec.write_text(
        spec.read_text().replace("kind: inprocess", "kind: inprocess\n    template_id: iso-live")
    )
    async with orchestrator(tmp_path, templates=()) as o:
        first = await o.host.register_directory(src, SHARED_TENANT)
        assert first.phase == "deployed", first
        old = await o.session("iso-live")
        r = await o.invoke(old, {})
        assert r.json()["result"]["who"] == expected("iso-a")

        rewrite(src, "iso-a:", "v2:")  # same template id, new content and digest
        second = await o.host.register_directory(src, SHARED_TENANT)
        assert (second.id, second.phase) == ("iso-live", "deployed")
        assert second.digest != first.digest
        new = await o.session("iso-live")
        r = await o.invoke(new, {"late": True})
        assert r.json()["result"]["who"] == {**expected("v2"), "late": "v2:late"}
        new_module = r.json()["result"]["module"]

        # The old session runs the old code, including a module it first imports now.
        r = await o.invoke(old, {"late": True})
        assert r.json()["result"]["who"] == {**expected("iso-a"), "late": "iso-a:late"}
        assert r.json()["result"]["module"] != new_module


# -- the policy: uploads run as process sandboxes unless trusted -----------------------------------


def test_decide_sandbox() -> None:
    from ppio_sandbox.orchestrator._policy import (
        OPERATOR,
        REQUESTED,
        TRUSTED_UPLOADS,
        UPLOADS_AS_PROCESS,
        decide_sandbox,
    )

    cases = {
        ("inprocess", True, False): ("inprocess", OPERATOR),
        ("inprocess", True, True): ("inprocess", OPERATOR),
        ("inprocess", False, False): ("process", UPLOADS_AS_PROCESS),
        ("inprocess", False, True): ("inprocess", TRUSTED_UPLOADS),
        ("process", True, False): ("process", REQUESTED),
        ("process", False, False): ("process", REQUESTED),
        ("process", False, True): ("process", REQUESTED),
    }
    for (requested, operator, trust), (kind, reason) in cases.items():
        decision = decide_sandbox(requested, operator=operator, trust_uploads=trust)
        assert decision.view() == {"kind": kind, "requested": requested, "reason": reason}


def test_serve_takes_trust_uploads() -> None:
    argv = ["serve", "--trust-uploads"]
    assert build_parser(argv).parse_args(argv).trust_uploads is True
    assert build_parser(["serve"]).parse_args(["serve"]).trust_uploads is False


async def upload_and_wait(client: httpx.AsyncClient, src: Path) -> dict[str, Any]:
    r = await client.post(
        "/v1/templates",
        content=pack_directory(src),
        headers={"Content-Type": "application/gzip"},
    )
    assert r.status_code == 202, r.text
    view: dict[str, Any] = r.json()
    with anyio.fail_after(30):
        while view["phase"] not in ("deployed", "failed"):
            await anyio.sleep(0.02)  # the build runs in the background
            view = (await client.get(f"/v1/templates/{view['template_id']}")).json()
    return view


@pytest.mark.parametrize("trust", [False, True])
async def test_an_upload_runs_in_process_only_when_the_operator_trusts_uploads(
    tmp_path: Path, trust: bool
) -> None:
    from ppio_sandbox.orchestrator._policy import OPERATOR, TRUSTED_UPLOADS, UPLOADS_AS_PROCESS

    src = tmp_path / "upload"
    shutil.copytree(TEMPLATES / "echo", src)
    spec = src / ".ppio-agent.yaml"
    spec.write_text(spec.read_text().replace("name: echo", "name: uploaded"))
    async with orchestrator(tmp_path, templates=("echo",), trust_uploads=trust) as o:
        operator = (await o.client.get("/v1/templates/echo")).json()
        assert operator["sandbox"] == {
            "kind": "inprocess",
            "requested": "inprocess",
            "reason": OPERATOR,
        }

        view = await upload_and_wait(o.client, src)
        assert view["phase"] == "deployed", view
        kind, reason = ("inprocess", TRUSTED_UPLOADS) if trust else ("process", UPLOADS_AS_PROCESS)
        assert view["sandbox"] == {"kind": kind, "requested": "inprocess", "reason": reason}
        assert view["spec"]["sandbox"]["kind"] == "inprocess"  # the spec is as uploaded

        sid = await o.session(view["template_id"])
        session = (await o.client.get(f"/v1/sessions/{sid}")).json()
        assert session["sandbox"]["kind"] == kind
        r = await o.invoke(sid, {"prompt": "where am I?"})
        assert r.status_code == 200, r.text
        assert (r.json()["result"]["pid"] == os.getpid()) is trust
