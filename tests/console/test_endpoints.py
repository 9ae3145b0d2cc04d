"""What the console stands on, without a browser: its files under ``/ui`` (open, and
holding no data), ``/`` sending a browser there, and the two API routes it added,
``GET /v1/sessions/{id}/turns`` and ``GET /v1/stats`` (authenticated, tenant-scoped)."""

from __future__ import annotations

import tomllib
from fnmatch import fnmatch
from pathlib import Path

import anyio
import pytest

from tests.orchestrator.conftest import orchestrator

from .conftest import KEYS, OTHER_SECRET, SECRET

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
CONSOLE = ROOT / "orchestrator" / "console"
BEARER = {"Authorization": f"Bearer {SECRET}"}


async def test_console_files_are_open_and_hold_no_data(tmp_path: Path) -> None:
    async with orchestrator(tmp_path, api_keys=KEYS) as orch:  # its client sends no key
        client = orch.client
        page = await client.get("/ui")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp
        assert "frame-ancestors 'none'" in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["cache-control"] == "no-cache"
        assert page.content == (CONSOLE / "index.html").read_bytes()
        assert (await client.get("/ui/")).content == page.content
        for name, ctype in (("console.js", "text/javascript"), ("console.css", "text/css")):
            asset = await client.get(f"/ui/{name}")
            assert asset.status_code == 200
            assert asset.headers["content-type"].startswith(ctype)
            assert asset.content == (CONSOLE / name).read_bytes()
        # Revalidation, HEAD, and nothing else.
        again = await client.get("/ui", headers={"If-None-Match": page.headers["etag"]})
        assert again.status_code == 304
        assert again.content == b""
        head = await client.head("/ui/console.js")
        assert head.status_code == 200
        assert head.content == b""
        assert int(head.headers["content-length"]) == (CONSOLE / "console.js").stat().st_size
        post = await client.post("/ui", content=b"x")
        assert post.status_code == 405
        assert post.headers["allow"] == "GET, HEAD"
        for missing in ("/ui/nope.js", "/ui/%2e%2e/frontend.py", "/ui/../api.py", "/uix"):
            assert (await client.get(missing)).status_code == 404, missing
        # The data is not open: without the key, or with another's wrong one, a 401.
        async with orch.other_client(**BEARER) as owner:
            created = await owner.post("/v1/sessions", json={"template_id": "echo"})
            sid = created.json()["session_id"]
        for path in ("/v1/stats", f"/v1/sessions/{sid}/turns", "/v1/sessions"):
            assert (await client.get(path)).status_code == 401, path
            wrong = await client.get(path, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401, path


async def test_root_sends_a_browser_to_the_console(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as orch:
        browser = await orch.client.get("/", headers={"Accept": "text/html,*/*;q=0.8"})
        assert browser.status_code == 302
        assert browser.headers["location"] == "/ui"
        assert browser.headers["vary"] == "accept"
        api = await orch.client.get("/", headers={"Accept": "application/json"})
        assert api.status_code == 404
        assert api.json()["error"]["type"] == "NotFoundError"


async def test_turns_show_request_strategy_outcome_duration_and_reply(tmp_path: Path) -> None:
    async with orchestrator(tmp_path, api_keys=KEYS, headers=BEARER) as orch:
        sid = await orch.session(metadata={"who": "turns"})
        asks = [
            ({"prompt": "first"}, {"X-PPIO-Strategy": "reject"}),
            ({"prompt": "x" * 600}, {}),
            ({"action": "fail"}, {"X-PPIO-Strategy": "interrupt"}),
            ({"action": "stream", "count": 3}, {}),
        ]
        for n, (body, headers) in enumerate(asks):
            reply = await orch.invoke(sid, body, **{"X-PPIO-Request-Id": f"req-{n}", **headers})
            assert reply.status_code in (200, 500), reply.text
        view = (await orch.client.get(f"/v1/sessions/{sid}/turns")).json()
        assert view["session_id"] == sid
        assert view["status"] == "ready"
        assert view["running"] is None
        assert view["queued"] == 0
        turns = view["turns"]
        assert [t["request_id"] for t in turns] == ["req-0", "req-1", "req-2", "req-3"]
        assert [t["strategy"] for t in turns] == ["reject", "enqueue", "interrupt", "enqueue"]
        assert [t["outcome"] for t in turns] == ["ok", "ok", "error", "ok"]
        for turn in turns:
            assert turn["duration"] >= 0
            assert turn["submitted_at"] <= turn["started_at"] <= turn["finished_at"]
        assert turns[0]["reply"].startswith('{"turn":1,"echo":"first"')
        # The first bytes only, and how many there were.
        assert len(turns[1]["reply"]) == 256
        assert turns[1]["reply_bytes"] > 600
        assert turns[2]["error"]["message"]
        assert "failed on purpose" in turns[2]["reply"]
        assert turns[3]["streaming"]
        assert turns[3]["chunks"] == 3
        assert turns[3]["reply"] == '[{"i":0},{"i":1},{"i":2}]'
        # ?limit= keeps the newest; nonsense is a 400.
        last = (await orch.client.get(f"/v1/sessions/{sid}/turns?limit=2")).json()["turns"]
        assert [t["request_id"] for t in last] == ["req-2", "req-3"]
        for bad in ("0", "201", "two", "-1"):
            answer = await orch.client.get(f"/v1/sessions/{sid}/turns?limit={bad}")
            assert answer.status_code == 400, bad
        # Another tenant cannot see them.
        async with orch.other_client(Authorization=f"Bearer {OTHER_SECRET}") as other:
            assert (await other.get(f"/v1/sessions/{sid}/turns")).status_code == 404


async def test_turns_show_the_running_turn(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as orch:
        sid = await orch.session()
        async with anyio.create_task_group() as tg:
            tg.start_soon(orch.invoke, sid, {"action": "sleep", "seconds": 0.5})
            with anyio.fail_after(5):
                while True:
                    view = (await orch.client.get(f"/v1/sessions/{sid}/turns")).json()
                    if view["running"] is not None:
                        break
                    await anyio.sleep(0.01)
        running = view["running"]
        assert running["outcome"] == "running"
        assert running["finished_at"] is None
        assert running["duration"] is None
        assert "reply" not in running
        assert view["status"] == "busy"


async def test_stats_count_the_tenants_sessions_and_the_nodes_turns(tmp_path: Path) -> None:
    async with orchestrator(tmp_path, api_keys=KEYS, headers=BEARER) as orch:
        mine = [await orch.session() for _ in range(2)]
        assert (await orch.client.post(f"/v1/sessions/{mine[1]}/pause")).status_code == 200
        for _ in range(3):
            assert (await orch.invoke(mine[0], {"prompt": "hi"})).status_code == 200
        async with orch.other_client(Authorization=f"Bearer {OTHER_SECRET}") as other:
            await other.post("/v1/sessions", json={"template_id": "echo"})
            theirs = (await other.get("/v1/stats")).json()
        stats = (await orch.client.get("/v1/stats")).json()
        assert stats["tenant"] == "acme"
        assert theirs["tenant"] == "zenith"
        assert stats["sessions"] == {
            "by_state": {"ready": 1, "paused": 1},
            "active": 2,
            "running_turns": 0,
            "queued_turns": 0,
        }
        assert theirs["sessions"]["by_state"] == {"ready": 1}
        # The node's figures: the same counters as /metrics.
        assert stats["node"] == {"sessions": 3, "running_turns": 0, "accepting": True}
        turns = stats["turns"]
        assert turns["by_outcome"]["ok"] == 3
        assert turns["by_outcome"]["error"] == 0
        histogram = turns["duration_seconds"]
        assert len(histogram["counts"]) == len(histogram["buckets"]) + 1
        assert sum(histogram["counts"]) == histogram["count"] == 3
        assert stats["sandboxes"]["starts"]["inprocess"] == 3
        assert stats["sandboxes"]["crashes"] == {"inprocess": 0, "process": 0}
        metrics = (await orch.client.get("/metrics")).text
        assert 'ppio_turns_total{outcome="ok"} 3.0' in metrics
        assert "ppio_turn_duration_seconds_count 3" in metrics


def test_a_wheel_ships_the_console() -> None:
    """Every console file matches ``[tool.setuptools.package-data]`` (no build step to forget)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["ppio_sandbox.orchestrator"]
    files = sorted(p.relative_to(CONSOLE.parent).as_posix() for p in CONSOLE.iterdir())
    assert {"console/index.html", "console/console.js", "console/console.css"} <= set(files)
    for name in files:
        assert any(fnmatch(name, pattern) for pattern in patterns), name
