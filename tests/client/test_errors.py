"""Every error surfaces as the class the server named."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from ppio_sandbox.client import (
    IdempotencyConflictError,
    InvocationCancelledError,
    InvocationError,
    SessionBusyError,
    SessionNotFoundError,
    TemplateNotFoundError,
    TooManyRequestsError,
    ValidationError,
)
from ppio_sandbox.orchestrator.session_core import SessionLimits

from .conftest import Running, client_for, orchestrator

pytestmark = pytest.mark.anyio

LONG_TURN = {"action": "sleep", "seconds": 5}
"""Longer than any check made while it runs; tests cut it short rather than wait for it."""


async def until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll ``predicate`` (orchestrator state, in this process) until it holds."""
    with anyio.move_on_after(timeout):
        while not predicate():
            await anyio.sleep(0.002)
        return
    raise AssertionError(f"timed out waiting for {what}")


def turn_running(o: Running, session_id: str) -> Callable[[], bool]:
    """Whether the orchestrator has started a turn of the session."""
    core = o.host.get_session("default", session_id).core
    return lambda: core.running is not None


async def test_a_closed_session_answers_session_not_found(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o, client_for(o) as client:
        session = await client.create_session("echo")
        await session.close()
        assert session.status == "closed"
        await session.close()  # closing twice is fine
        with pytest.raises(SessionNotFoundError, match="closed by the caller") as caught:
            await session.invoke("late")
        assert caught.value.status_code == 404
        with pytest.raises(SessionNotFoundError):
            await client.get_session(session.session_id)
        with pytest.raises(SessionNotFoundError):
            await session.refresh()


async def test_unknown_templates_answer_template_not_found(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o, client_for(o) as client:
        with pytest.raises(TemplateNotFoundError):
            await client.invoke_agent("no-such-agent", "hi")
        with pytest.raises(TemplateNotFoundError):
            await client.create_session("no-such-agent")
        with pytest.raises(TemplateNotFoundError):
            await client.get_template("no-such-agent")
        with pytest.raises(TemplateNotFoundError):
            async for _ in client.stream_agent("no-such-agent", "hi"):
                pass
        assert o.host.list_sessions("default") == []


async def test_an_agent_that_raises_is_an_invocation_error(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o, client_for(o) as client:
        with pytest.raises(InvocationError, match="failed on purpose") as caught:
            await client.invoke_agent("echo", {"action": "fail"})
        assert caught.value.status_code == 500
        assert caught.value.request_id


async def test_reject_strategy_raises_session_busy(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o, client_for(o) as client:
        session = await client.create_session("echo")
        cut_off: list[BaseException] = []

        async def long_turn() -> None:
            try:
                await session.invoke(LONG_TURN)
            except InvocationCancelledError as exc:
                cut_off.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(long_turn)
            await until(turn_running(o, session.session_id), "the long turn to start")
            with pytest.raises(SessionBusyError):
                await session.invoke("now", strategy="reject")
            with pytest.raises(ValidationError, match="unknown strategy"):
                await session.invoke("now", strategy="sideways")  # type: ignore[call-overload]
            await session.invoke("cut it short", strategy="interrupt")
        assert len(cut_off) == 1
        assert (await session.invoke("after", strategy="reject")).result["echo"] == "after"
        await session.close()


async def test_interrupt_strategy_cancels_the_running_turn(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o, client_for(o) as client:
        session = await client.create_session("echo")
        outcome: list[BaseException] = []

        async def long_turn() -> None:
            try:
                await session.invoke(LONG_TURN)
            except InvocationCancelledError as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(long_turn)
            # Running, not only queued: an interrupt would otherwise just go first.
            await until(turn_running(o, session.session_id), "the long turn to start")
            reply = await session.invoke("urgent", strategy="interrupt")
        assert reply.result["echo"] == "urgent"
        assert len(outcome) == 1
        await session.close()


async def test_idempotency_key_replays_and_conflicts(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o, client_for(o) as client:
        session = await client.create_session("echo")
        first = await session.invoke("same", idempotency_key="key-1")
        replay = await session.invoke("same", idempotency_key="key-1")
        assert replay.result == first.result  # stored reply: the turn ran once
        with pytest.raises(IdempotencyConflictError) as caught:
            await session.invoke("different", idempotency_key="key-1")
        assert caught.value.status_code == 422
        assert (await session.invoke("next")).result["turn"] == 2
        await session.close()


async def test_a_full_mailbox_raises_too_many_requests_with_retry_after(tmp_path: Path) -> None:
    limits = SessionLimits(mailbox_size=1)
    async with orchestrator(tmp_path, limits=limits) as o, client_for(o, max_retries=0) as client:
        session = await client.create_session("echo")
        core = o.host.get_session("default", session.session_id).core
        async with anyio.create_task_group() as tg:
            tg.start_soon(session.invoke, LONG_TURN)
            await until(turn_running(o, session.session_id), "the long turn to start")
            tg.start_soon(session.invoke, "queued")
            await until(lambda: core.queued == 1, "a queued turn")
            with pytest.raises(TooManyRequestsError) as caught:
                await session.invoke("one too many")
            tg.cancel_scope.cancel()  # both callers give up
        assert caught.value.retry_after >= 1
        await session.close()  # which ends the long turn
