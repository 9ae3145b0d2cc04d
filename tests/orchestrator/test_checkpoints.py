"""Checkpoints: sessions, their state and their recent turns outlive a restart."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from ppio_sandbox.agent_runtime.errors import ServiceUnavailableError
from ppio_sandbox.orchestrator.actor import Session
from ppio_sandbox.orchestrator.checkpoints import (
    Checkpointer,
    Durability,
    UnserializableState,
    encode_checkpoint,
    record_of,
    state_of,
    turns_of,
)
from ppio_sandbox.orchestrator.session_core import SessionCore, Strategy, Turn, TurnOutcome
from ppio_sandbox.orchestrator.state_store import (
    Checkpoint,
    MemoryStateStore,
    SessionRecord,
    SQLiteStateStore,
    decode_record,
)

from .conftest import orchestrator

pytestmark = pytest.mark.anyio


def _session(sid: str = "s1") -> Session:
    core = SessionCore(sid, now=100.0, timeout_seconds=60)
    core.started(100.0)
    return Session(core, tenant="t", template_id="echo-1", metadata={"m": 1})


def _run_turn(session: Session, key: str, result: Any, now: float, **kw: Any) -> Turn:
    core = session.core
    core.admit(
        Turn(key, key.encode(), {}, request_id=f"r-{key}", submitted_at=now), Strategy.ENQUEUE, now
    )
    turn = core.next_turn(now)
    assert turn is not None
    if kw.get("chunks") is not None:
        core.stream_started(turn)
        for chunk in kw["chunks"]:
            core.add_chunk(turn, chunk)
        result = None
    core.finish(
        turn, kw.get("outcome", TurnOutcome.OK), now + 0.5, result=result, error=kw.get("error")
    )
    return turn


def test_a_record_round_trips_state_and_turns() -> None:
    session = _session()
    session.state = {"count": 3, "nested": {"a": [1, 2.5, None, "x"]}, "raw": b"\x00\x01"}
    _run_turn(session, "k1", {"answer": 42}, 101.0)
    _run_turn(session, "k2", None, 102.0, chunks=[{"i": 0}, {"i": 1}])
    _run_turn(
        session, "k3", None, 103.0, outcome=TurnOutcome.ERROR, error=ServiceUnavailableError("x")
    )
    record = record_of(session, wall_offset=1000.0, seq=7)
    again = decode_record(encode_checkpoint(record, None).data)
    assert again.created_at == 1100.0
    assert again.seq == 7
    assert again.metadata == {"m": 1}
    assert state_of(again) == session.state
    turns = {t.key: t for t in turns_of(again, wall_offset=1000.0)}
    assert turns["k1"].result == {"answer": 42}
    assert turns["k1"].finished_at == 101.5
    assert turns["k2"].streaming
    assert turns["k2"].events == [{"i": 0}, {"i": 1}]
    assert isinstance(turns["k3"].error, ServiceUnavailableError)
    assert turns["k3"].error.message == "x"
    restored = SessionCore.restored(
        "s1",
        created_at=again.created_at - 1000.0,
        last_activity=again.last_activity - 1000.0,
        timeout_seconds=again.timeout_seconds,
        turns=list(turns.values()),
    )
    # A retry of a checkpointed key replays; an unknown key is a new turn.
    replay = Turn("k1", b"k1", {}, request_id="again", submitted_at=104.0)
    restored.started(104.0)
    admission, turn, _ = restored.admit(replay, Strategy.ENQUEUE, 104.0)
    assert admission.value == "replay"
    assert turn.result == {"answer": 42}


def test_an_unserializable_state_is_refused_not_crashed_on() -> None:
    session = _session()
    session.state = {"lock": anyio.Lock()}
    with pytest.raises(UnserializableState):
        record_of(session, wall_offset=0.0, seq=1)


def test_crashed_turns_are_not_checkpointed() -> None:
    session = _session()
    _run_turn(
        session, "k1", None, 101.0, outcome=TurnOutcome.CRASHED, error=ServiceUnavailableError()
    )
    assert record_of(session, wall_offset=0.0, seq=1).turns == []


class _FlakyStore(MemoryStateStore):
    def __init__(self) -> None:
        super().__init__()
        self.fail = False
        self.fenced: set[str] = set()

    async def save(self, batch: Any) -> list[bool]:
        if self.fail:
            raise OSError("disk on fire")
        results = [c.record.session_id not in self.fenced for c in batch]
        await super().save([c for c, ok in zip(batch, results, strict=True) if ok])
        return results


def _checkpointer(store: MemoryStateStore, durability: Durability, lost: list[str]) -> Checkpointer:
    def snapshot(session: Session) -> Checkpoint:
        return encode_checkpoint(record_of(session, wall_offset=0.0, seq=session.changes), None)

    return Checkpointer(
        store,
        durability,
        snapshot=snapshot,
        lost=lambda s: lost.append(s.session_id),
        interval=0.05,
    )


async def test_interval_durability_coalesces_many_changes_into_one_write() -> None:
    store = _FlakyStore()
    checkpoints = _checkpointer(store, Durability.INTERVAL, [])
    sessions = [_session(f"s{i}") for i in range(10)]
    for session in sessions * 5:
        session.changes += 1
        checkpoints.mark(session)
    await checkpoints.write_round()
    assert store.writes == 1
    assert len(store.records) == 10
    assert all(s.saved == 5 for s in sessions)


async def test_turn_durability_waits_for_the_write_and_raises_when_the_store_fails() -> None:
    store = _FlakyStore()
    lost: list[str] = []
    checkpoints = _checkpointer(store, Durability.TURN, lost)
    a, b = _session("a"), _session("b")
    async with anyio.create_task_group() as tg:
        tg.start_soon(checkpoints.run)
        with anyio.fail_after(5):
            a.changes = 1
            await checkpoints.flush([a])
            assert a.saved == 1
            assert ("t", "a") in store.records
            store.fail = True
            b.changes = 1
            with pytest.raises(ServiceUnavailableError, match="disk on fire"):
                await checkpoints.flush([b])
            store.fail = False
            await checkpoints.flush()  # b stayed dirty and is written now
            assert b.saved == 1
            store.fenced.add("a")
            a.changes = 2
            await checkpoints.flush([a])
            assert lost == ["a"]
            assert a.saved == 1
        tg.cancel_scope.cancel()


async def test_sqlite_keeps_the_newest_checkpoint(tmp_path: Path) -> None:
    store = SQLiteStateStore(tmp_path / "s.sqlite3")
    await store.open()
    try:
        session = _session()
        for seq in (3, 1, 2):
            session.state = {"seq": seq}
            await store.save([encode_checkpoint(record_of(session, wall_offset=0, seq=seq), None)])
        record = await store.load("t", "s1")
        assert record is not None
        assert record.seq == 3
        assert state_of(record) == {"seq": 3}
        assert [r.session_id for r in await store.list("t")] == ["s1"]
        assert await store.list("other") == []
        await store.delete("t", "s1")
        assert await store.load("t", "s1") is None
    finally:
        await store.close()


async def _turn(o: Any, sid: str, body: dict[str, Any], key: str | None = None) -> Any:
    headers = {"Idempotency-Key": key} if key else {}
    r = await o.invoke(sid, body, **headers)
    assert r.status_code == 200, r.text
    return r


@pytest.mark.parametrize("durability", [Durability.INTERVAL, Durability.TURN])
async def test_a_restart_keeps_sessions_their_state_and_their_recent_replies(
    tmp_path: Path, durability: Durability
) -> None:
    async with orchestrator(tmp_path, durability=durability) as o:
        sid = await o.session(timeout_seconds=600, metadata={"user": "u1"})
        for i in range(3):
            r = await _turn(o, sid, {"prompt": f"p{i}"}, key=f"key-{i}")
        assert r.json()["result"]["turn"] == 3
        named = await o.client.post(
            "/v1/agents/echo/invocations", json={}, headers={"X-PPIO-Session-Id": "chat-1"}
        )
        assert named.status_code == 200
    # A new orchestrator on the same data dir.
    async with orchestrator(tmp_path, durability=durability) as o:
        listed = (await o.client.get("/v1/sessions")).json()["sessions"]
        assert {s["session_id"] for s in listed} == {sid, "chat-1"}
        replay = await _turn(o, sid, {"prompt": "p2"}, key="key-2")
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.json()["result"]["turn"] == 3
        r = await _turn(o, sid, {"prompt": "p3"})
        assert r.json()["result"]["turn"] == 4  # context.state came back
        view = (await o.client.get(f"/v1/sessions/{sid}")).json()
        assert view["metadata"] == {"user": "u1"}
        assert view["timeout_seconds"] == 600
        assert view["turns"]["ok"] == 4
        r = await o.client.post(
            "/v1/agents/echo/invocations", json={}, headers={"X-PPIO-Session-Id": "chat-1"}
        )
        assert r.json()["result"]["turn"] == 2
        # A closed session does not come back.
        assert (await o.client.delete(f"/v1/sessions/{sid}")).status_code == 200
    async with orchestrator(tmp_path, durability=durability) as o:
        assert (await o.client.get(f"/v1/sessions/{sid}")).status_code == 404
        listed = (await o.client.get("/v1/sessions")).json()["sessions"]
        assert [s["session_id"] for s in listed] == ["chat-1"]


async def test_durability_none_keeps_nothing(tmp_path: Path) -> None:
    async with orchestrator(tmp_path, durability=Durability.NONE) as o:
        sid = await o.session()
        await _turn(o, sid, {})
    async with orchestrator(tmp_path, durability=Durability.NONE) as o:
        assert (await o.client.get(f"/v1/sessions/{sid}")).status_code == 404
        assert (await o.client.get("/v1/sessions")).json()["sessions"] == []


async def test_an_unserializable_state_warns_counts_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "ppio_sandbox.orchestrator")
    async with orchestrator(tmp_path, durability=Durability.TURN) as o:
        sid = await o.session()
        await _turn(o, sid, {})  # turn 1: checkpointed
        r = await _turn(o, sid, {"action": "unserializable"})  # turn 2: cannot be
        assert r.status_code == 200
        await _turn(o, sid, {})  # still serving
        metrics = (await o.client.get("/metrics")).text
        series = 'ppio_checkpoint_failures_total{reason="unserializable"} '
        counted = [line for line in metrics.splitlines() if line.startswith(series)]
        assert len(counted) == 1
        assert float(counted[0].split()[-1]) >= 2
        warnings = [r for r in caplog.records if "cannot be checkpointed" in r.getMessage()]
        assert len(warnings) == 1
        assert sid in warnings[0].getMessage()
    async with orchestrator(tmp_path, durability=Durability.TURN) as o:
        r = await _turn(o, sid, {})
        assert r.json()["result"]["turn"] == 2  # back to turn 1's checkpoint


async def test_an_expired_dormant_session_is_gone_after_a_restart(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o:
        sid = await o.session(timeout_seconds=0.2)
        await _turn(o, sid, {})
    record_path = tmp_path / "data" / "sessions.sqlite3"
    assert record_path.exists()
    await anyio.sleep(0.3)  # the idle timeout itself is what is tested
    async with orchestrator(tmp_path) as o:
        r = await o.client.get(f"/v1/sessions/{sid}")
        assert r.status_code == 404
        assert "expired after 0.2 s idle" in r.json()["error"]["message"]


def test_records_are_compact() -> None:
    session = _session()
    session.state = {"turns": 3}
    record = record_of(session, wall_offset=0.0, seq=1)
    assert isinstance(record, SessionRecord)
    assert len(msgspec.msgpack.encode(record)) < 200


async def test_concurrent_first_uses_of_one_name_agree_on_one_session(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o:
        replies: list[Any] = []

        async def first_use(i: int) -> None:
            r = await o.client.post(
                "/v1/agents/echo/invocations",
                json={"prompt": f"p{i}"},
                headers={"X-PPIO-Session-Id": "chat-race"},
            )
            replies.append(r)

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(first_use, i)
        assert [r.status_code for r in replies] == [200] * 8, [r.text for r in replies]
        assert sorted(r.json()["result"]["turn"] for r in replies) == list(range(1, 9))


async def test_a_checkpoint_taken_mid_turn_holds_the_state_of_the_last_finished_turn(
    tmp_path: Path,
) -> None:
    async with orchestrator(tmp_path, durability=Durability.INTERVAL) as o:
        sid = await o.session()
        await _turn(o, sid, {"prompt": "one"})  # state: turns=1
        session = o.host.get_session("default", sid)
        async with anyio.create_task_group() as tg:
            tg.start_soon(o.invoke, sid, {"action": "sleep", "seconds": 1})
            with anyio.fail_after(5):
                while session.core.running is None:
                    await anyio.sleep(0.01)
            assert session.state == {"turns": 2}  # the running turn has changed the live dict
            await o.host.sessions.checkpoints.flush([session])
            record = await o.host.sessions.store.load("default", sid)
            assert record is not None
            assert state_of(record) == {"turns": 1}  # as turn 1 left it, with turn 1 recorded
            assert len(record.turns) == 1
            tg.cancel_scope.cancel()
