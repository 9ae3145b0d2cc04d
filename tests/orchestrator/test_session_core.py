"""The session state machine, driven with a fake clock (plain floats, no I/O)."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from ppio_sandbox.agent_runtime.errors import (
    IdempotencyConflictError,
    InvocationCancelledError,
    ServiceUnavailableError,
    SessionBusyError,
    SessionNotFoundError,
    TooManyRequestsError,
    ValidationError,
)
from ppio_sandbox.orchestrator.session_core import (
    Admission,
    IllegalTransition,
    SessionCore,
    SessionLimits,
    SessionState,
    Strategy,
    Turn,
    TurnOutcome,
)

ENQUEUE, REJECT, INTERRUPT = Strategy.ENQUEUE, Strategy.REJECT, Strategy.INTERRUPT


def make_turn(key: str = "k1", body: bytes = b"body-1", *, now: float = 0.0) -> Turn:
    return Turn(key, body, {"prompt": key}, request_id=f"req-{key}", submitted_at=now)


def make_core(*, now: float = 0.0, started: bool = True, **limits: Any) -> SessionCore:
    core = SessionCore("s1", now=now, limits=SessionLimits(**limits))
    if started:
        core.started(now)
    return core


def admit(core: SessionCore, key: str, now: float, strategy: Strategy = ENQUEUE) -> Turn:
    """Admit a new turn that must be queued; return it."""
    turn = make_turn(key, now=now)
    admission, got, _ = core.admit(turn, strategy, now)
    assert admission is Admission.QUEUED
    assert got is turn
    return turn


def run_to_end(core: SessionCore, key: str, now: float) -> Turn:
    """Admit, start and finish one turn at ``now`` on an idle session."""
    turn = admit(core, key, now)
    assert core.next_turn(now) is turn
    core.finish(turn, TurnOutcome.OK, now)
    return turn


# -- lifecycle ----------------------------------------------------------------


def test_a_new_session_is_starting_until_started_then_ready() -> None:
    core = SessionCore("s1", now=5.0)
    assert core.state is SessionState.STARTING
    assert core.created_at == 5.0
    assert core.last_activity == 5.0
    assert not core.ended
    core.started(7.0)
    assert core.state is SessionState.READY
    assert core.last_activity == 7.0


def test_started_is_illegal_unless_starting() -> None:
    core = make_core(now=0.0)
    core.pause(1.0)
    with pytest.raises(IllegalTransition, match="started\\(\\) while paused"):
        core.started(2.0)
    assert core.state is SessionState.PAUSED
    assert core.last_activity == 1.0


def test_no_turn_runs_while_starting_and_queued_turns_run_once_started() -> None:
    core = make_core(started=False)
    turn = admit(core, "a", 1.0)
    assert core.next_turn(1.0) is None
    core.started(2.0)
    assert core.next_turn(2.0) is turn
    assert core.state is SessionState.BUSY


def test_pause_and_resume_move_between_ready_and_paused() -> None:
    core = make_core()
    core.pause(1.0)
    assert core.state is SessionState.PAUSED
    assert core.paused
    assert core.last_activity == 1.0
    core.resume(2.0)
    assert core.state is SessionState.READY
    assert not core.paused
    assert core.last_activity == 2.0


def test_pause_while_a_turn_runs_resumes_to_busy() -> None:
    core = make_core()
    turn = admit(core, "a", 1.0)
    assert core.next_turn(1.0) is turn
    core.pause(2.0)
    assert core.state is SessionState.PAUSED
    core.resume(3.0)
    assert core.state is SessionState.BUSY
    assert core.running is turn


def test_a_turn_finishing_while_paused_leaves_the_session_paused() -> None:
    core = make_core()
    turn = admit(core, "a", 1.0)
    core.next_turn(1.0)
    core.pause(2.0)
    core.finish(turn, TurnOutcome.OK, 3.0)
    assert core.state is SessionState.PAUSED
    assert core.running is None
    core.resume(4.0)
    assert core.state is SessionState.READY


def test_resume_of_a_session_that_is_not_paused_changes_no_state() -> None:
    core = make_core()
    core.resume(1.0)
    assert core.state is SessionState.READY
    turn = admit(core, "a", 2.0)
    core.next_turn(2.0)
    core.resume(3.0)
    assert core.state is SessionState.BUSY
    assert core.running is turn


def test_pause_while_starting_raises_service_unavailable() -> None:
    core = make_core(started=False)
    with pytest.raises(ServiceUnavailableError, match="still starting") as exc_info:
        core.pause(1.0)
    assert exc_info.value.status_code == 503
    assert core.state is SessionState.STARTING


IDLE_REASON = "expired after 900 s idle"
LIFETIME_REASON = "reached its maximum lifetime (28800 s)"
FAIL_REASON = "failed: its sandbox crashed more than 3 times in 60 s"


def _closed_by_caller(core: SessionCore) -> str:
    core.begin_close("closed by the caller")
    core.closed()
    return "closed by the caller"


def _closing(core: SessionCore) -> str:
    core.begin_close("closed by the caller")
    return "closed by the caller"


def _expired_idle(core: SessionCore) -> str:
    reason = core.expiry_reason(900.0)
    assert reason == IDLE_REASON
    core.begin_close(reason)
    core.closed()
    return reason


def _max_lifetime(core: SessionCore) -> str:
    turn = admit(core, "a", 0.0)
    core.next_turn(0.0)
    core.finish(turn, TurnOutcome.OK, 28_799.0)
    reason = core.expiry_reason(28_800.0)
    assert reason == LIFETIME_REASON
    core.begin_close(reason)
    core.closed()
    return reason


def _failed(core: SessionCore) -> str:
    core.fail(FAIL_REASON)
    return FAIL_REASON


ENDINGS = pytest.mark.parametrize(
    "end",
    [_closed_by_caller, _closing, _expired_idle, _max_lifetime, _failed],
    ids=["closed-by-caller", "closing", "expired-idle", "max-lifetime", "failed"],
)


@ENDINGS
def test_every_operation_on_an_ended_session_raises_not_found_naming_the_reason(
    end: Any,
) -> None:
    core = make_core()
    reason = end(core)
    assert core.ended
    assert core.end_reason == reason
    expected = f"session s1 {reason}"
    calls = [
        core.check_alive,
        lambda: core.admit(make_turn("new"), ENQUEUE, 10.0),
        lambda: core.pause(10.0),
        lambda: core.resume(10.0),
        lambda: core.set_timeout(30.0, 10.0),
    ]
    for call in calls:
        with pytest.raises(SessionNotFoundError) as exc_info:
            call()
        assert str(exc_info.value) == expected
        assert exc_info.value.status_code == 404


@ENDINGS
def test_an_ended_session_runs_no_turn_and_has_no_expiry(end: Any) -> None:
    core = make_core()
    end(core)
    assert core.next_turn(50_000.0) is None
    assert core.expiry_reason(50_000.0) is None


def test_closed_is_illegal_unless_closing() -> None:
    core = make_core()
    with pytest.raises(IllegalTransition, match="closed\\(\\) while ready"):
        core.closed()
    assert core.state is SessionState.READY


def test_the_turns_a_close_drops_end_with_its_error_and_the_running_one_is_asked_to_stop() -> None:
    core = make_core()
    running = admit(core, "a", 1.0)
    core.next_turn(1.0)
    queued = admit(core, "b", 1.5)
    dropped = core.begin_close("closed by the caller", 2.0)
    assert dropped == [queued]
    assert queued.done
    assert queued.outcome is TurnOutcome.CANCELLED
    assert isinstance(queued.error, SessionNotFoundError)
    assert str(queued.error) == "session s1 closed by the caller"
    assert running.stop_error is not None
    assert not running.done
    assert not core.stop(running, SessionNotFoundError("again"))  # the first request wins
    core.finish(running, TurnOutcome.CANCELLED, 3.0)
    assert running.error is running.stop_error
    core.closed()
    assert core.state is SessionState.CLOSED


def test_finishing_a_turn_that_is_not_running_is_illegal() -> None:
    core = make_core()
    turn = admit(core, "a", 1.0)
    with pytest.raises(IllegalTransition):
        core.finish(turn, TurnOutcome.OK, 2.0)  # still queued
    core.next_turn(2.0)
    core.finish(turn, TurnOutcome.OK, 3.0, result={"x": 1})
    assert turn.result == {"x": 1}
    assert turn.outcome is TurnOutcome.OK
    with pytest.raises(IllegalTransition):
        core.finish(turn, TurnOutcome.OK, 4.0)  # already done
    with pytest.raises(IllegalTransition):
        core.stream_started(turn)
    with pytest.raises(IllegalTransition):
        core.add_chunk(turn, "late")


# -- turns: one at a time, in arrival order -------------------------------------


def test_turns_run_one_at_a_time_in_arrival_order() -> None:
    core = make_core()
    a, b, c = admit(core, "a", 1.0), admit(core, "b", 2.0), admit(core, "c", 3.0)
    assert core.queued == 3
    assert core.state is SessionState.READY

    assert core.next_turn(4.0) is a
    assert a.started_at == 4.0
    assert core.running is a
    assert core.state is SessionState.BUSY
    assert core.queued == 2
    assert core.next_turn(4.5) is None
    assert core.next_turn(4.6) is None

    core.finish(a, TurnOutcome.OK, 5.0)
    assert a.finished_at == 5.0
    assert a.done
    assert core.running is None
    assert core.state is SessionState.READY

    assert core.next_turn(6.0) is b
    assert core.state is SessionState.BUSY
    assert core.next_turn(6.5) is None
    core.finish(b, TurnOutcome.ERROR, 7.0)
    assert core.next_turn(8.0) is c
    core.finish(c, TurnOutcome.OK, 9.0)

    assert core.next_turn(10.0) is None
    assert core.state is SessionState.READY
    assert core.queued == 0
    assert (core.turns_ok, core.turns_failed) == (2, 1)


def test_next_turn_on_an_empty_mailbox_is_none_and_stays_ready() -> None:
    core = make_core()
    assert core.next_turn(1.0) is None
    assert core.state is SessionState.READY
    assert core.running is None


def test_no_turn_starts_while_paused_and_queued_turns_run_after_resume() -> None:
    core = make_core()
    core.pause(1.0)
    a, b = admit(core, "a", 2.0), admit(core, "b", 3.0)
    assert core.next_turn(4.0) is None
    assert core.state is SessionState.PAUSED
    assert core.queued == 2
    core.resume(5.0)
    assert core.next_turn(5.0) is a
    core.finish(a, TurnOutcome.OK, 6.0)
    assert core.next_turn(6.0) is b


def test_no_queued_turn_starts_when_paused_between_turns() -> None:
    core = make_core()
    a, b = admit(core, "a", 1.0), admit(core, "b", 1.0)
    core.next_turn(1.0)
    core.pause(2.0)
    core.finish(a, TurnOutcome.OK, 3.0)
    assert core.next_turn(3.0) is None
    core.resume(4.0)
    assert core.next_turn(4.0) is b


def test_no_turn_starts_after_close() -> None:
    core = make_core()
    admit(core, "a", 1.0)
    admit(core, "b", 1.0)
    core.begin_close("closed by the caller")
    assert core.next_turn(2.0) is None
    core.closed()
    assert core.next_turn(3.0) is None
    assert core.running is None


@pytest.mark.parametrize(
    ("outcome", "ok", "failed"),
    [
        (TurnOutcome.OK, 1, 0),
        (TurnOutcome.ERROR, 0, 1),
        (TurnOutcome.TIMEOUT, 0, 1),
        (TurnOutcome.CANCELLED, 0, 1),
        (TurnOutcome.CRASHED, 0, 1),
    ],
)
def test_finish_counts_ok_and_failed_turns(outcome: TurnOutcome, ok: int, failed: int) -> None:
    core = make_core()
    turn = admit(core, "a", 1.0)
    core.next_turn(1.0)
    core.finish(turn, outcome, 2.0)
    assert (core.turns_ok, core.turns_failed) == (ok, failed)


# -- strategies -------------------------------------------------------------------


def test_enqueue_strategy_queues_behind_a_running_turn() -> None:
    core = make_core()
    a = admit(core, "a", 1.0)
    core.next_turn(1.0)
    b = make_turn("b")
    admission, got, to_cancel = core.admit(b, ENQUEUE, 2.0)
    assert (admission, got, to_cancel) == (Admission.QUEUED, b, None)
    assert core.running is a
    assert core.queued == 1


def test_reject_strategy_raises_session_busy_when_a_turn_is_running() -> None:
    core = make_core()
    a = admit(core, "a", 1.0)
    core.next_turn(1.0)
    with pytest.raises(SessionBusyError) as exc_info:
        core.admit(make_turn("b"), REJECT, 2.0)
    assert exc_info.value.status_code == 409
    assert core.queued == 0
    assert core.running is a
    assert core.cached_turns == 1  # the rejected key was not remembered


def test_reject_strategy_raises_session_busy_when_a_turn_is_queued() -> None:
    core = make_core()
    core.pause(0.5)  # keep "a" waiting: nothing runs, something is queued
    admit(core, "a", 1.0)
    with pytest.raises(SessionBusyError):
        core.admit(make_turn("b"), REJECT, 2.0)
    assert core.queued == 1


def test_a_rejected_key_can_be_admitted_later() -> None:
    core = make_core()
    a = admit(core, "a", 1.0)
    core.next_turn(1.0)
    with pytest.raises(SessionBusyError):
        core.admit(make_turn("b"), REJECT, 2.0)
    core.finish(a, TurnOutcome.OK, 3.0)
    admit(core, "b", 4.0, REJECT)


def test_reject_strategy_admits_when_idle() -> None:
    core = make_core()
    turn = make_turn("a")
    admission, got, to_cancel = core.admit(turn, REJECT, 1.0)
    assert (admission, got, to_cancel) == (Admission.QUEUED, turn, None)
    assert core.next_turn(1.0) is turn


def test_interrupt_returns_the_running_turn_and_runs_next_ahead_of_queued_turns() -> None:
    core = make_core()
    a = admit(core, "a", 1.0)
    assert core.next_turn(1.0) is a
    b, c = admit(core, "b", 2.0), admit(core, "c", 3.0)
    d = make_turn("d")
    admission, got, to_cancel = core.admit(d, INTERRUPT, 4.0)
    assert admission is Admission.QUEUED
    assert got is d
    assert to_cancel is a
    assert core.queued == 3
    # The core does not stop the running turn itself: the actor cancels it.
    assert core.running is a
    assert core.next_turn(4.0) is None
    core.finish(a, TurnOutcome.CANCELLED, 5.0)
    order = []
    for t in (6.0, 7.0, 8.0):
        turn = core.next_turn(t)
        assert turn is not None
        order.append(turn)
        core.finish(turn, TurnOutcome.OK, t)
    assert order == [d, b, c]
    assert (core.turns_ok, core.turns_failed) == (3, 1)


def test_interrupt_when_idle_has_nothing_to_cancel() -> None:
    core = make_core()
    turn = make_turn("a")
    assert core.admit(turn, INTERRUPT, 1.0) == (Admission.QUEUED, turn, None)
    assert core.next_turn(1.0) is turn


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, Strategy.ENQUEUE),
        ("", Strategy.ENQUEUE),
        ("enqueue", Strategy.ENQUEUE),
        ("reject", Strategy.REJECT),
        ("interrupt", Strategy.INTERRUPT),
        ("REJECT", Strategy.REJECT),
        ("Interrupt", Strategy.INTERRUPT),
        ("EnQueue", Strategy.ENQUEUE),
    ],
)
def test_strategy_parse_defaults_to_enqueue_and_ignores_case(
    value: str | None, expected: Strategy
) -> None:
    assert Strategy.parse(value) is expected


@pytest.mark.parametrize("value", ["queue", "cancel", " reject", "reject "])
def test_strategy_parse_rejects_unknown_names(value: str) -> None:
    with pytest.raises(ValidationError, match="unknown strategy") as exc_info:
        Strategy.parse(value)
    assert exc_info.value.status_code == 400
    assert exc_info.value.__cause__ is None


# -- mailbox bound ------------------------------------------------------------------


def test_a_full_mailbox_raises_too_many_requests_with_retry_after() -> None:
    core = make_core(mailbox_size=2)
    admit(core, "a", 1.0)
    admit(core, "b", 1.0)
    with pytest.raises(TooManyRequestsError) as exc_info:
        core.admit(make_turn("c"), ENQUEUE, 2.0)
    err = exc_info.value
    assert err.status_code == 429
    assert err.retry_after > 0
    assert err.details["retry_after"] == err.retry_after
    assert core.queued == 2
    assert core.cached_turns == 2  # the refused key was not remembered


def test_the_running_turn_does_not_count_against_the_mailbox() -> None:
    core = make_core(mailbox_size=2)
    admit(core, "a", 1.0)
    core.next_turn(1.0)
    admit(core, "b", 1.0)
    admit(core, "c", 1.0)
    with pytest.raises(TooManyRequestsError):
        core.admit(make_turn("d"), ENQUEUE, 2.0)


@pytest.mark.parametrize("strategy", [ENQUEUE, INTERRUPT])
def test_a_full_mailbox_refuses_enqueue_and_interrupt(strategy: Strategy) -> None:
    core = make_core(mailbox_size=1)
    admit(core, "a", 1.0)
    with pytest.raises(TooManyRequestsError):
        core.admit(make_turn("b"), strategy, 2.0)
    assert core.queued == 1


def test_a_full_mailbox_admits_again_once_a_turn_starts() -> None:
    core = make_core(mailbox_size=1)
    a = admit(core, "a", 1.0)
    with pytest.raises(TooManyRequestsError):
        core.admit(make_turn("b"), ENQUEUE, 2.0)
    assert core.next_turn(3.0) is a
    admit(core, "b", 4.0)


def test_a_replay_or_join_is_still_answered_when_the_mailbox_is_full() -> None:
    core = make_core(mailbox_size=2)
    done = run_to_end(core, "done", 1.0)
    b = admit(core, "b", 2.0)
    admit(core, "c", 2.0)
    admission, got, to_cancel = core.admit(make_turn("done"), ENQUEUE, 3.0)
    assert (admission, got, to_cancel) == (Admission.REPLAY, done, None)
    admission, got, to_cancel = core.admit(make_turn("b"), ENQUEUE, 3.0)
    assert (admission, got, to_cancel) == (Admission.JOIN, b, None)
    assert core.queued == 2


# -- deadlines ----------------------------------------------------------------------


def test_idle_expiry_happens_exactly_at_last_activity_plus_timeout() -> None:
    core = make_core(now=0.0, timeout_seconds=30.0)
    assert core.expiry_reason(29.999) is None
    reason = core.expiry_reason(30.0)
    assert reason == "expired after 30 s idle"
    assert "idle" in reason
    assert core.expiry_reason(1000.0) == reason
    assert core.deadline() == 30.0


def test_the_constructor_timeout_overrides_the_limits_default() -> None:
    core = SessionCore("s1", now=0.0, limits=SessionLimits(timeout_seconds=30.0), timeout_seconds=5)
    assert core.timeout_seconds == 5
    assert core.expiry_reason(4.9) is None
    assert core.expiry_reason(5.0) == "expired after 5 s idle"


def test_started_restarts_the_idle_clock() -> None:
    core = make_core(started=False, timeout_seconds=30.0)
    core.started(20.0)
    assert core.expiry_reason(49.0) is None
    assert core.expiry_reason(50.0) is not None


def test_every_admitted_turn_resets_the_idle_clock() -> None:
    core = make_core(timeout_seconds=30.0)
    run_to_end(core, "a", 10.0)
    assert core.last_activity == 10.0
    assert core.expiry_reason(39.9) is None
    assert core.expiry_reason(40.0) is not None
    # A join or replay is not new work, but an admitted turn is.
    admit(core, "b", 35.0)
    assert core.last_activity == 35.0


def test_finish_resets_the_idle_clock() -> None:
    core = make_core(timeout_seconds=30.0)
    turn = admit(core, "a", 0.0)
    core.next_turn(0.0)
    core.finish(turn, TurnOutcome.OK, 100.0)
    assert core.last_activity == 100.0
    assert core.deadline() == 130.0
    assert core.expiry_reason(129.9) is None
    assert core.expiry_reason(130.0) == "expired after 30 s idle"


def test_touch_resets_the_idle_clock() -> None:
    core = make_core(timeout_seconds=30.0)
    core.touch(25.0)
    assert core.expiry_reason(54.0) is None
    assert core.deadline() == 55.0


def test_no_idle_expiry_while_a_turn_runs() -> None:
    core = make_core(timeout_seconds=30.0)
    admit(core, "a", 0.0)
    core.next_turn(0.0)
    assert core.expiry_reason(10_000.0) is None
    assert core.deadline() == core.created_at + core.limits.max_lifetime_seconds


def test_no_idle_expiry_while_turns_are_queued() -> None:
    core = make_core(timeout_seconds=30.0)
    admit(core, "a", 0.0)  # queued, not yet picked up by the actor
    assert core.expiry_reason(10_000.0) is None
    assert core.deadline() == 28_800.0


def test_a_paused_session_idles_out_even_with_turns_queued() -> None:
    core = make_core(timeout_seconds=30.0)
    core.pause(0.0)
    admit(core, "a", 0.0)
    assert core.expiry_reason(29.9) is None
    assert core.deadline() == 30.0
    reason = core.expiry_reason(30.0)
    assert reason is not None
    assert "idle" in reason


def test_max_lifetime_expires_even_while_busy() -> None:
    core = make_core(now=100.0, max_lifetime_seconds=50.0, timeout_seconds=1000.0)
    admit(core, "a", 100.0)
    core.next_turn(100.0)
    admit(core, "b", 120.0)
    assert core.expiry_reason(149.99) is None
    reason = core.expiry_reason(150.0)
    assert reason == "reached its maximum lifetime (50 s)"
    assert "maximum lifetime" in reason
    assert core.deadline() == 150.0


def test_max_lifetime_takes_precedence_over_idle() -> None:
    core = make_core(max_lifetime_seconds=50.0, timeout_seconds=10.0)
    assert core.expiry_reason(60.0) == "reached its maximum lifetime (50 s)"


def test_deadline_is_the_earlier_of_idle_and_lifetime_when_idle() -> None:
    core = make_core(now=0.0, timeout_seconds=30.0, max_lifetime_seconds=100.0)
    assert core.deadline() == 30.0
    core.touch(80.0)
    assert core.deadline() == 100.0  # lifetime (100) before idle (110)


def test_deadline_is_the_lifetime_only_when_active() -> None:
    core = make_core(now=0.0, timeout_seconds=30.0, max_lifetime_seconds=100.0)
    turn = admit(core, "a", 10.0)
    assert core.deadline() == 100.0  # queued
    core.next_turn(10.0)
    assert core.deadline() == 100.0  # running
    core.finish(turn, TurnOutcome.OK, 20.0)
    assert core.deadline() == 50.0  # idle again


def test_set_timeout_changes_the_timeout_and_restarts_the_idle_clock() -> None:
    core = make_core(now=0.0, timeout_seconds=30.0)
    core.set_timeout(60, 20.0)
    assert core.timeout_seconds == 60.0
    assert isinstance(core.timeout_seconds, float)
    assert core.last_activity == 20.0
    assert core.deadline() == 80.0
    assert core.expiry_reason(79.9) is None
    assert core.expiry_reason(80.0) == "expired after 60 s idle"


@pytest.mark.parametrize("seconds", [0, 0.0, -1, -0.5, float("nan")])
def test_set_timeout_rejects_non_positive_values(seconds: float) -> None:
    core = make_core(now=0.0, timeout_seconds=30.0)
    with pytest.raises(ValidationError) as exc_info:
        core.set_timeout(seconds, 10.0)
    assert exc_info.value.status_code == 400
    assert core.timeout_seconds == 30.0
    assert core.last_activity == 0.0


# -- idempotency ----------------------------------------------------------------------


def test_same_key_and_body_while_queued_joins_the_same_turn() -> None:
    core = make_core()
    first = admit(core, "k", 1.0)
    again = make_turn("k")
    admission, got, to_cancel = core.admit(again, ENQUEUE, 2.0)
    assert admission is Admission.JOIN
    assert got is first
    assert got is not again
    assert to_cancel is None
    assert core.queued == 1


def test_same_key_and_body_while_running_joins_the_same_turn() -> None:
    core = make_core()
    first = admit(core, "k", 1.0)
    core.next_turn(1.0)
    admission, got, _ = core.admit(make_turn("k"), ENQUEUE, 2.0)
    assert admission is Admission.JOIN
    assert got is first
    assert core.queued == 0


@pytest.mark.parametrize("strategy", [REJECT, INTERRUPT])
def test_a_join_ignores_the_strategy(strategy: Strategy) -> None:
    core = make_core()
    first = admit(core, "k", 1.0)
    core.next_turn(1.0)
    assert core.admit(make_turn("k"), strategy, 2.0) == (Admission.JOIN, first, None)
    assert core.queued == 0


def test_same_key_and_body_after_finish_replays_the_same_turn() -> None:
    core = make_core()
    first = run_to_end(core, "k", 1.0)
    first.result = {"answer": 42}
    admission, got, to_cancel = core.admit(make_turn("k"), ENQUEUE, 2.0)
    assert (admission, got, to_cancel) == (Admission.REPLAY, first, None)
    assert got.result == {"answer": 42}
    assert core.queued == 0
    assert core.next_turn(3.0) is None


def test_a_join_or_replay_does_not_reset_the_idle_clock() -> None:
    core = make_core(timeout_seconds=30.0)
    run_to_end(core, "k", 1.0)
    core.admit(make_turn("k"), ENQUEUE, 20.0)
    assert core.last_activity == 1.0


def test_same_key_with_a_different_body_while_running_is_a_conflict() -> None:
    core = make_core()
    admit(core, "k", 1.0)
    core.next_turn(1.0)
    with pytest.raises(IdempotencyConflictError, match="'k'") as exc_info:
        core.admit(make_turn("k", b"other body"), ENQUEUE, 2.0)
    assert exc_info.value.status_code == 422
    assert core.queued == 0


def test_same_key_with_a_different_body_after_finish_is_a_conflict() -> None:
    core = make_core()
    first = run_to_end(core, "k", 1.0)
    with pytest.raises(IdempotencyConflictError) as exc_info:
        core.admit(make_turn("k", b"other body"), ENQUEUE, 2.0)
    assert exc_info.value.status_code == 422
    # The original is still replayable.
    assert core.admit(make_turn("k"), ENQUEUE, 3.0) == (Admission.REPLAY, first, None)


def test_a_concurrent_duplicate_creates_only_one_queued_turn() -> None:
    core = make_core()
    first = make_turn("k")
    second = make_turn("k")
    assert core.admit(first, ENQUEUE, 1.0)[0] is Admission.QUEUED
    assert core.admit(second, ENQUEUE, 1.0) == (Admission.JOIN, first, None)
    assert core.queued == 1
    assert core.cached_turns == 1
    assert core.next_turn(2.0) is first
    assert core.next_turn(2.0) is None


def test_the_cache_forgets_the_oldest_finished_key_beyond_idempotency_max() -> None:
    core = make_core(idempotency_max=3)
    turns = [run_to_end(core, f"k{i}", float(i)) for i in range(4)]
    assert core.cached_turns == 3
    for i in (1, 2, 3):
        assert core.admit(make_turn(f"k{i}"), ENQUEUE, 10.0) == (
            Admission.REPLAY,
            turns[i],
            None,
        )
    fresh = make_turn("k0")
    admission, got, _ = core.admit(fresh, ENQUEUE, 11.0)
    assert admission is Admission.QUEUED
    assert got is fresh
    assert got is not turns[0]
    assert core.queued == 1


def test_a_forgotten_key_can_be_reused_with_another_body() -> None:
    core = make_core(idempotency_max=1)
    run_to_end(core, "k", 1.0)
    run_to_end(core, "other", 2.0)
    turn = make_turn("k", b"a different body")
    assert core.admit(turn, ENQUEUE, 3.0)[0] is Admission.QUEUED


def test_a_finished_key_replays_until_just_before_its_ttl_and_is_forgotten_at_it() -> None:
    core = make_core(idempotency_ttl=10.0)
    first = run_to_end(core, "k", 100.0)
    assert core.admit(make_turn("k"), ENQUEUE, 109.9) == (Admission.REPLAY, first, None)
    fresh = make_turn("k")
    assert core.admit(fresh, ENQUEUE, 110.0) == (Admission.QUEUED, fresh, None)
    assert core.queued == 1


def test_the_ttl_counts_from_finish_not_from_submission() -> None:
    core = make_core(idempotency_ttl=10.0)
    turn = admit(core, "k", 0.0)
    core.next_turn(0.0)
    core.finish(turn, TurnOutcome.OK, 50.0)
    assert core.admit(make_turn("k"), ENQUEUE, 59.0)[0] is Admission.REPLAY


def test_unfinished_turns_are_never_evicted_even_over_the_count() -> None:
    core = make_core(idempotency_max=2, idempotency_ttl=1.0)
    turns = [admit(core, f"k{i}", 0.0) for i in range(4)]
    assert core.cached_turns == 4
    core.next_turn(0.0)
    for i, turn in enumerate(turns):
        assert core.admit(make_turn(f"k{i}"), ENQUEUE, 1000.0) == (Admission.JOIN, turn, None)
    assert core.cached_turns == 4
    assert core.queued == 3


def test_over_the_count_a_finished_key_behind_unfinished_ones_is_evicted() -> None:
    core = make_core(idempotency_max=2)
    a = admit(core, "a", 0.0)
    core.next_turn(0.0)  # "a" runs and stays unfinished
    b = admit(core, "b", 1.0)
    assert core.cancel_queued(b, 2.0)  # "b" is now finished, behind "a"
    admit(core, "c", 3.0)  # three keys, limit two: "b" goes, "a" stays
    assert core.cached_turns == 2
    assert core.admit(make_turn("a"), ENQUEUE, 4.0) == (Admission.JOIN, a, None)
    assert core.admit(make_turn("b"), ENQUEUE, 4.0)[0] is Admission.QUEUED


def test_a_key_cancelled_behind_a_running_turn_is_forgotten_after_its_ttl() -> None:
    core = make_core(idempotency_ttl=10.0)
    admit(core, "long", 0.0)
    core.next_turn(0.0)  # runs for a long time
    waiting = admit(core, "k", 1.0)
    assert core.cancel_queued(waiting, 1.0)
    fresh = make_turn("k")
    assert core.admit(fresh, ENQUEUE, 11.0) == (Admission.QUEUED, fresh, None)


def test_an_interrupting_turn_is_forgotten_after_its_ttl_while_an_older_turn_runs() -> None:
    core = make_core(idempotency_ttl=10.0)
    a = admit(core, "a", 0.0)
    core.next_turn(0.0)
    admit(core, "b", 0.0)  # older than "c", runs after it
    c = admit(core, "c", 0.0, INTERRUPT)
    core.finish(a, TurnOutcome.CANCELLED, 1.0)
    assert core.next_turn(1.0) is c
    core.finish(c, TurnOutcome.OK, 2.0)
    assert core.next_turn(2.0) is not None  # "b" runs, unfinished, from now on
    fresh = make_turn("c")
    assert core.admit(fresh, ENQUEUE, 12.0) == (Admission.QUEUED, fresh, None)


# -- restart budget -------------------------------------------------------------------


def test_sandbox_crashes_are_restarted_within_the_budget_and_window() -> None:
    core = make_core(restart_budget=3, restart_window=60.0)
    assert core.restarts == 0
    assert [core.sandbox_crashed(t) for t in (0.0, 10.0, 20.0)] == [True, True, True]
    assert core.restarts == 3
    assert core.sandbox_crashed(30.0) is False
    assert core.sandbox_crashed(60.0) is False  # the crash at 0 is still in the window
    assert core.restarts == 3  # refused crashes are not recorded
    assert core.sandbox_crashed(60.5) is True  # the crash at 0 slid out
    assert core.restarts == 3
    assert core.sandbox_crashed(61.0) is False
    assert core.sandbox_crashed(200.0) is True
    assert core.restarts == 1


def test_a_zero_restart_budget_never_restarts() -> None:
    core = make_core(restart_budget=0)
    assert core.sandbox_crashed(0.0) is False
    assert core.sandbox_crashed(1000.0) is False


# -- close and fail -------------------------------------------------------------------


def test_begin_close_returns_the_queued_turns_and_empties_the_mailbox() -> None:
    core = make_core()
    a = admit(core, "a", 1.0)
    core.next_turn(1.0)
    b, c = admit(core, "b", 2.0), admit(core, "c", 2.0)
    pending = core.begin_close("closed by the caller")
    assert pending == [b, c]
    assert pending[0] is b
    assert core.queued == 0
    assert core.state is SessionState.CLOSING
    assert core.end_reason == "closed by the caller"
    assert core.ended
    assert core.running is a  # the actor cancels the running turn itself
    core.finish(a, TurnOutcome.CANCELLED, 3.0)
    assert core.state is SessionState.CLOSING
    core.closed()
    assert core.state is SessionState.CLOSED


def test_begin_close_on_an_idle_session_returns_nothing() -> None:
    core = make_core()
    assert core.begin_close("closed by the caller") == []
    assert core.state is SessionState.CLOSING


def test_begin_close_twice_keeps_the_first_reason() -> None:
    core = make_core()
    core.begin_close("closed by the caller")
    assert core.begin_close("expired after 900 s idle") == []
    assert core.end_reason == "closed by the caller"


def test_fail_returns_the_queued_turns_and_sets_failed_with_the_reason() -> None:
    core = make_core()
    admit(core, "a", 1.0)
    core.next_turn(1.0)
    b, c = admit(core, "b", 2.0), admit(core, "c", 2.0)
    assert core.fail(FAIL_REASON) == [b, c]
    assert core.queued == 0
    assert core.state is SessionState.FAILED
    assert core.end_reason == FAIL_REASON
    assert core.ended


def test_fail_of_a_fresh_session_allocates_nothing() -> None:
    core = SessionCore("s1", now=0.0)
    assert core.fail("failed: could not start") == []
    assert core._mailbox is None
    assert core.state is SessionState.FAILED


def test_closed_moves_closing_to_closed_but_keeps_failed() -> None:
    closing = make_core()
    closing.begin_close("closed by the caller")
    closing.closed()
    assert closing.state is SessionState.CLOSED
    failed = make_core()
    failed.fail(FAIL_REASON)
    failed.closed()
    assert failed.state is SessionState.FAILED
    assert failed.end_reason == FAIL_REASON


def test_cancel_queued_removes_a_waiting_turn_and_marks_it_cancelled() -> None:
    core = make_core()
    a = admit(core, "a", 1.0)
    core.next_turn(1.0)
    b, c = admit(core, "b", 2.0), admit(core, "c", 2.0)
    assert core.cancel_queued(b, 3.0) is True
    assert isinstance(b.error, InvocationCancelledError)
    assert b.error.status_code == 409
    assert b.finished_at == 3.0
    assert b.done
    assert core.queued == 1
    assert c.error is None
    core.finish(a, TurnOutcome.OK, 4.0)
    assert core.next_turn(4.0) is c


def test_cancel_queued_does_nothing_for_a_running_or_unknown_turn() -> None:
    core = make_core()
    assert core.cancel_queued(make_turn("x"), 0.5) is False  # no mailbox yet
    a = admit(core, "a", 1.0)
    core.next_turn(1.0)
    admit(core, "b", 1.0)
    assert core.cancel_queued(a, 2.0) is False
    assert a.error is None
    assert a.finished_at is None
    assert core.cancel_queued(make_turn("b"), 2.0) is False  # same key, other object
    assert core.queued == 1


# -- limits and memory ----------------------------------------------------------------


def test_limits_default_to_the_design_values() -> None:
    limits = SessionLimits()
    assert limits.timeout_seconds == 900.0
    assert limits.max_lifetime_seconds == 8 * 3600.0
    assert limits.mailbox_size == 64
    assert limits.idempotency_max == 128
    assert limits.idempotency_ttl == 3600.0
    assert limits.restart_budget == 3
    assert limits.restart_window == 60.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timeout_seconds": 0},
        {"timeout_seconds": -1},
        {"max_lifetime_seconds": 0},
        {"mailbox_size": 0},
        {"idempotency_max": 0},
    ],
)
def test_limits_reject_out_of_range_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        SessionLimits(**kwargs)


def test_a_fresh_session_allocates_no_containers_and_stays_small() -> None:
    core = SessionCore("s1", now=0.0)
    core.started(0.0)
    assert core._mailbox is None
    assert core._cache is None
    assert core._restarts is None
    assert core.queued == 0
    assert core.cached_turns == 0
    assert core.restarts == 0
    assert core.deadline() == 900.0
    assert core.expiry_reason(1.0) is None
    assert core.next_turn(1.0) is None
    assert core._mailbox is None
    assert sys.getsizeof(core) < 200
    assert not hasattr(core, "__dict__")


def test_containers_are_allocated_only_when_used() -> None:
    core = make_core()
    admit(core, "a", 1.0)
    assert core._mailbox is not None
    assert core._cache is not None
    assert core._restarts is None
    core.sandbox_crashed(2.0)
    assert core._restarts is not None


def test_a_crashed_turn_is_forgotten_so_a_retry_runs_it_again() -> None:
    core = make_core()
    first = admit(core, "k", 0.0)
    assert core.next_turn(0.0) is first
    core.finish(first, TurnOutcome.CRASHED, 1.0)
    again = Turn("k", first.body_hash, {}, request_id="r2", submitted_at=2.0)
    admission, turn, _ = core.admit(again, Strategy.ENQUEUE, 2.0)
    assert admission is Admission.QUEUED
    assert turn is again
