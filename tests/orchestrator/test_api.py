"""The orchestrator end to end over HTTP, in-process sandboxes, both backends."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from ppio_sandbox.agent_runtime.sse import iter_events
from ppio_sandbox.orchestrator.actor import STREAM_WINDOW
from ppio_sandbox.orchestrator.session_core import SessionCore, SessionLimits

from .conftest import orchestrator

pytestmark = pytest.mark.anyio


def events_of(text: str) -> list[Any]:
    return list(iter_events(iter(text.split("\n"))))


async def test_session_keeps_state_across_turns_and_sessions_are_isolated(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o:
        a, b = await o.session(), await o.session()
        for expected in (1, 2, 3):
            r = await o.invoke(a, {"prompt": f"a{expected}"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["status"] == "success"
            assert body["result"]["turn"] == expected
            assert body["result"]["echo"] == f"a{expected}"
            assert body["result"]["session_id"] == a
            assert body["metadata"]["session_id"] == a
        r = await o.invoke(b, {"prompt": "b"})
        assert r.json()["result"]["turn"] == 1
        view = (await o.client.get(f"/v1/sessions/{a}")).json()
        assert view["status"] == "ready"
        assert view["turns"] == {"ok": 3, "failed": 0, "queued": 0}


async def test_turns_of_one_session_run_one_at_a_time_in_arrival_order(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o:
        sid = await o.session()
        results: list[dict[str, Any]] = []

        async def call(i: int) -> None:
            r = await o.invoke(sid, {"action": "sleep", "seconds": 0.02, "prompt": i})
            assert r.status_code == 200, r.text
            results.append(r.json()["result"])

        core = o.host.get_session("default", sid).core
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(call, i)
                # The next request is sent once this one is admitted: the order is known.
                await until(lambda n=i + 1: admitted(core) == n, f"request {i} admitted")
        results.sort(key=lambda r: r["turn"])
        assert [r["echo"] for r in results] == list(range(8))
        for earlier, later in itertools.pairwise(results):
            assert earlier["ended"] <= later["started"]  # never overlapping


async def test_different_sessions_run_in_parallel(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o:
        sids = [await o.session() for _ in range(5)]
        cores = [o.host.get_session("default", sid).core for sid in sids]
        statuses: list[int] = []

        async def long_turn(sid: str) -> None:
            statuses.append((await o.invoke(sid, {"action": "sleep", "seconds": 5})).status_code)

        async with anyio.create_task_group() as tg:
            for sid in sids:
                tg.start_soon(long_turn, sid)
            # All five run at once: none waits for another session's turn.
            await until(lambda: all(c.running is not None for c in cores), "five turns at once")
            for sid in sids:  # then cut them short
                r = await o.invoke(sid, {}, **{"X-PPIO-Strategy": "interrupt"})
                assert r.status_code == 200
        assert statuses == [409] * 5  # interrupted


async def test_streaming_invocation_and_resume_from_last_event_id(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o:
        sid = await o.session()
        key = "stream-key-1"
        body = {"action": "stream", "count": 4}
        r = await o.invoke(sid, body, **{"Idempotency-Key": key})
        assert r.headers["content-type"].startswith("text/event-stream")
        events = events_of(r.text)
        assert [(e.id, e.json()) for e in events[:4]] == [(str(i + 1), {"i": i}) for i in range(4)]
        assert events[4].event == "done"
        again = await o.invoke(sid, body, **{"Idempotency-Key": key, "Last-Event-ID": "2"})
        replayed = events_of(again.text)
        assert again.headers["idempotent-replayed"] == "true"
        assert [e.json() for e in replayed if e.event == "message"] == [{"i": 2}, {"i": 3}]
        assert replayed[-1].event == "done"


async def test_agent_error_fails_only_that_turn(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o:
        sid = await o.session()
        r = await o.invoke(sid, {"action": "fail"})
        assert r.status_code == 500
        assert r.json()["error"]["type"] == "InvocationError"
        assert "failed on purpose" in r.json()["error"]["message"]
        ok = await o.invoke(sid, {})
        assert ok.status_code == 200
        assert ok.json()["result"]["turn"] == 2


async def test_reject_strategy_answers_409_when_busy(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o:
        sid = await o.session()
        async with anyio.create_task_group() as tg:
            # A turn longer than any check takes (cut short below), not a short think time.
            tg.start_soon(o.invoke, sid, {"action": "sleep", "seconds": 5})
            await _wait_state(o, sid, "busy")
            r = await o.invoke(sid, {}, **{"X-PPIO-Strategy": "reject"})
            assert r.status_code == 409
            assert r.json()["error"]["type"] == "SessionBusyError"
            cut = await o.invoke(sid, {}, **{"X-PPIO-Strategy": "interrupt"})
            assert cut.status_code == 200
        idle = await o.invoke(sid, {}, **{"X-PPIO-Strategy": "reject"})
        assert idle.status_code == 200


async def test_interrupt_cancels_the_running_turn_then_runs_the_new_one(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o:
        sid = await o.session()
        first: dict[str, Any] = {}

        async def slow() -> None:
            r = await o.invoke(sid, {"action": "sleep", "seconds": 5})
            first["status"], first["body"] = r.status_code, r.json()

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow)
            await _wait_state(o, sid, "busy")
            started = time.monotonic()
            r = await o.invoke(sid, {"prompt": "new"}, **{"X-PPIO-Strategy": "interrupt"})
            assert r.status_code == 200
            assert r.json()["result"]["echo"] == "new"
            assert time.monotonic() - started < 2
        assert first["status"] == 409
        assert first["body"]["error"]["type"] == "InvocationCancelledError"
        assert "interrupted" in first["body"]["error"]["message"]


async def test_full_mailbox_answers_429_with_retry_after(tmp_path: Path) -> None:
    limits = SessionLimits(mailbox_size=2)
    async with orchestrator(tmp_path, limits=limits) as o:
        sid = await o.session()
        core = o.host.get_session("default", sid).core
        async with anyio.create_task_group() as tg:
            # A turn longer than any check takes (the session is closed below).
            tg.start_soon(o.invoke, sid, {"action": "sleep", "seconds": 5})
            await _wait_state(o, sid, "busy")
            tg.start_soon(o.invoke, sid, {})
            tg.start_soon(o.invoke, sid, {})
            await until(lambda: core.queued == 2, "two queued turns")
            r = await o.invoke(sid, {})
            assert r.status_code == 429
            assert r.json()["error"]["type"] == "TooManyRequestsError"
            assert int(r.headers["retry-after"]) >= 1
            closed = await o.client.delete(f"/v1/sessions/{sid}")  # ends every turn
            assert closed.status_code == 200


async def test_idempotency_replay_join_and_conflict(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o:
        sid = await o.session()
        body = {"action": "sleep", "seconds": 0.3, "prompt": "once"}
        replies: list[Any] = []

        async def call() -> None:
            r = await o.invoke(sid, body, **{"Idempotency-Key": "k1"})
            replies.append(r)

        async with anyio.create_task_group() as tg:  # the concurrent duplicate joins
            tg.start_soon(call)
            tg.start_soon(call)
        assert [r.status_code for r in replies] == [200, 200]
        assert replies[0].json()["result"] == replies[1].json()["result"]
        replay = await o.invoke(sid, body, **{"Idempotency-Key": "k1"})
        assert replay.json()["result"] == replies[0].json()["result"]
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.headers["idempotency-key"] == "k1"
        conflict = await o.invoke(sid, {"prompt": "other"}, **{"Idempotency-Key": "k1"})
        assert conflict.status_code == 422
        assert conflict.json()["error"]["type"] == "IdempotencyConflictError"
        state = (await o.invoke(sid, {"action": "state"})).json()["result"]["state"]
        assert state["turns"] == 2  # the duplicated turn ran once, plus this one
        fresh = await o.invoke(sid, {})
        assert len(fresh.headers["idempotency-key"]) >= 16  # generated when absent


async def test_idle_session_expires_and_says_why(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o:
        sid = await o.session(timeout_seconds=0.3)
        with anyio.fail_after(5):
            while (r := await o.client.get(f"/v1/sessions/{sid}")).status_code == 200:
                await anyio.sleep(0.05)
        assert r.status_code == 404
        assert r.json()["error"]["type"] == "SessionNotFoundError"
        assert "idle" in r.json()["error"]["message"]
        late = await o.invoke(sid, {})
        assert late.status_code == 404
        assert "idle" in late.json()["error"]["message"]


async def test_max_lifetime_ends_a_busy_session(tmp_path: Path) -> None:
    limits = SessionLimits(max_lifetime_seconds=0.5)
    async with orchestrator(tmp_path, limits=limits) as o:
        sid = await o.session()
        r = await o.invoke(sid, {"action": "sleep", "seconds": 3})
        assert r.status_code == 404
        assert "maximum lifetime" in r.json()["error"]["message"]


async def test_set_timeout_and_close(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o:
        sid = await o.session()
        r = await o.client.post(f"/v1/sessions/{sid}/timeout", json={"timeout_seconds": 42})
        assert r.json()["timeout_seconds"] == 42
        bad = await o.client.post(f"/v1/sessions/{sid}/timeout", json={"timeout_seconds": -1})
        assert bad.status_code == 400
        closed = await o.client.delete(f"/v1/sessions/{sid}")
        assert closed.status_code == 200
        gone = await o.invoke(sid, {})
        assert gone.status_code == 404
        assert "closed by the caller" in gone.json()["error"]["message"]
        listed = (await o.client.get("/v1/sessions")).json()["sessions"]
        assert sid not in [s["session_id"] for s in listed]


async def test_pause_holds_the_mailbox_and_resume_runs_it(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o:
        sid = await o.session()
        assert (await o.client.post(f"/v1/sessions/{sid}/pause")).json()["status"] == "paused"
        done = anyio.Event()
        result: dict[str, Any] = {}

        async def call() -> None:
            r = await o.invoke(sid, {"prompt": "held"})
            result["body"] = r.json()
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            with anyio.move_on_after(0.3):
                await done.wait()
            assert not done.is_set()
            resumed = await o.client.post(f"/v1/sessions/{sid}/resume")
            assert resumed.json()["status"] in ("ready", "busy")
        assert result["body"]["result"]["echo"] == "held"


async def test_agentcore_route_creates_the_named_session_then_reuses_it(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o:
        template = (await o.client.get("/v1/templates")).json()["templates"][0]["template_id"]
        for name in (template, "echo"):  # the id or the bare name
            for turn in (1, 2):
                r = await o.client.post(
                    f"/v1/agents/{name}/invocations",
                    json={"prompt": "x"},
                    headers={"X-PPIO-Session-Id": f"ac-{name}"},
                )
                assert r.status_code == 200, r.text
                assert r.json()["result"]["turn"] == turn
                assert r.headers["x-ppio-session-id"] == f"ac-{name}"
        missing = await o.client.post("/v1/agents/nope/invocations", json={})
        assert missing.status_code == 404
        assert missing.json()["error"]["type"] == "TemplateNotFoundError"


async def test_tenants_see_only_their_own_sessions(tmp_path: Path) -> None:
    keys = ["alpha:ka:secret-a", "beta:kb:secret-b"]
    async with orchestrator(
        tmp_path, api_keys=keys, headers={"Authorization": "Bearer secret-a"}
    ) as o:
        sid = await o.session()
        async with o.other_client(Authorization="Bearer secret-b") as beta:
            assert (await beta.get(f"/v1/sessions/{sid}")).status_code == 404
            r = await beta.post(f"/v1/sessions/{sid}/invocations", json={})
            assert r.status_code == 404
            assert (await beta.delete(f"/v1/sessions/{sid}")).status_code == 404
            assert (await beta.get("/v1/sessions")).json()["sessions"] == []
        async with o.other_client() as anonymous:
            r = await anonymous.get("/v1/sessions")
            assert r.status_code == 401
            assert r.json()["error"]["type"] == "AuthenticationError"
        async with o.other_client(Authorization="Bearer wrong") as wrong:
            assert (await wrong.get("/v1/sessions")).status_code == 401
        assert (await o.client.get(f"/v1/sessions/{sid}")).status_code == 200


@pytest.mark.parametrize(
    ("content", "ctype", "status"),
    [
        (b"{not json", "application/json", 400),
        (b"\xff\xfe", "application/json", 400),
        (b"[" * 100_000, "application/json", 400),
        (b"", "application/json", 400),
        (b"[1, 2]", "application/json", 400),
        (b"hello", "text/plain", 415),
    ],
)
async def test_malformed_invocation_bodies_get_4xx(
    tmp_path: Path, content: bytes, ctype: str, status: int
) -> None:
    async with orchestrator(tmp_path) as o:
        sid = await o.session()
        r = await o.client.post(
            f"/v1/sessions/{sid}/invocations", content=content, headers={"content-type": ctype}
        )
        assert r.status_code == status
        assert set(r.json()["error"]) >= {"type", "message"}
        bad_create = await o.client.post(
            "/v1/sessions", content=content, headers={"content-type": ctype}
        )
        assert 400 <= bad_create.status_code < 500


async def test_msgpack_in_and_out(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o:
        sid = await o.session()
        r = await o.client.post(
            f"/v1/sessions/{sid}/invocations",
            content=msgspec.msgpack.encode({"prompt": "packed"}),
            headers={"content-type": "application/msgpack", "accept": "application/msgpack"},
        )
        assert r.headers["content-type"] == "application/msgpack"
        assert msgspec.msgpack.decode(r.content)["result"]["echo"] == "packed"


async def test_health_and_metrics(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o:
        sid = await o.session()
        await o.invoke(sid, {})
        await o.invoke(sid, {"action": "fail"})
        health = (await o.client.get("/healthz")).json()
        assert health["status"] == "Healthy"
        assert health["sessions"] == 1
        metrics = (await o.client.get("/metrics")).text
        assert 'ppio_turns_total{outcome="ok"} 1' in metrics
        assert 'ppio_turns_total{outcome="error"} 1' in metrics
        assert 'ppio_sessions{state="ready"} 1' in metrics
        assert "ppio_turn_duration_seconds_count 2" in metrics
        assert 'ppio_http_requests_total{route="invocations",status="200"} 1' in metrics
        assert 'ppio_http_requests_total{route="invocations",status="500"} 1' in metrics
        assert 'ppio_http_requests_total{route="sessions",status="201"} 1' in metrics


async def test_stream_reader_disconnect_cancels_the_turn(tmp_path: Path) -> None:
    async with orchestrator(tmp_path, stream_resume_grace=0.1) as o:
        sid = await o.session()
        body = {"action": "stream", "count": 100_000, "delay": 0}
        async with o.client.stream("POST", f"/v1/sessions/{sid}/invocations", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("id: 3"):
                    break
        with anyio.fail_after(5):
            while True:
                view = (await o.client.get(f"/v1/sessions/{sid}")).json()
                if view["turns"]["failed"] == 1:
                    break
                await anyio.sleep(0.02)
        core = o.host.get_session("default", sid).core
        assert core._cache is not None
        cancelled = next(t for t in core._cache.values() if t.streaming)
        assert cancelled.error is not None
        assert cancelled.error.error_type == "InvocationCancelledError"
        assert len(cancelled.events) <= cancelled.acked + STREAM_WINDOW  # backpressure held
        state = (await o.invoke(sid, {"action": "state"})).json()["result"]["state"]
        assert state["stream_closed"] == 1  # the agent's generator was closed
        started = time.monotonic()
        assert (await o.client.get("/ping")).status_code == 200
        assert time.monotonic() - started < 1


async def until(predicate: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    """Poll ``predicate`` (orchestrator state, in this process) until it holds."""
    with anyio.move_on_after(timeout):
        while not predicate():
            await anyio.sleep(0.002)
        return
    raise AssertionError(f"timed out waiting for {what}")


def admitted(core: SessionCore) -> int:
    """Turns the session has admitted: finished, running or queued."""
    return core.turns_ok + core.turns_failed + (core.running is not None) + core.queued


async def _wait_state(o: Any, sid: str, state: str) -> None:
    with anyio.fail_after(5):
        while (await o.client.get(f"/v1/sessions/{sid}")).json()["status"] != state:
            await anyio.sleep(0.01)
