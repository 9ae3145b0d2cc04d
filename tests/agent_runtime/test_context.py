from __future__ import annotations

from datetime import UTC

from ppio_sandbox.agent_runtime import RequestContext, SessionStateStore


def test_state_store_evicts_least_recently_used() -> None:
    store = SessionStateStore(max_sessions=2)
    store.get("a")["n"] = 1
    store.get("b")["n"] = 2
    assert store.get("a")["n"] == 1  # touch a: b is now the oldest
    store.get("c")
    assert "b" not in store
    assert "a" in store
    assert len(store) == 2


def test_context_state_is_shared_per_session_and_private_without_one() -> None:
    store = SessionStateStore()
    one = RequestContext(session_id="s", state_store=store)
    one.state["x"] = 1
    assert RequestContext(session_id="s", state_store=store).state == {"x": 1}
    anon = RequestContext(session_id=None, state_store=store)
    anon.state["y"] = 2
    assert RequestContext(session_id=None, state_store=store).state == {}
    assert len(store) == 1


def test_state_is_created_lazily() -> None:
    store = SessionStateStore()
    RequestContext(session_id="never-touched", state_store=store)
    assert len(store) == 0


def test_context_headers_are_lowercased_from_raw_and_timestamp_is_aware() -> None:
    ctx = RequestContext(raw_headers=[(b"X-Thing", b"v")], request_id="r")
    assert ctx.headers == {"x-thing": "v"}
    assert ctx.timestamp.tzinfo is UTC
    assert "request_id='r'" in repr(ctx)


def test_injected_state_wins_over_the_store() -> None:
    mine: dict[str, int] = {"k": 1}
    ctx = RequestContext(session_id="s", state=mine, state_store=SessionStateStore())
    assert ctx.state is mine
