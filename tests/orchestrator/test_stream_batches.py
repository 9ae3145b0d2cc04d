"""A stream reader takes every chunk that is ready at once, in order, and paces the agent."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from ppio_sandbox.orchestrator.actor import BATCH_MAX, notify, read_batches
from ppio_sandbox.orchestrator.session_core import Turn

pytestmark = pytest.mark.anyio


def turn_with(events: list[Any], *, done: bool) -> Turn:
    turn = Turn("k", b"", {}, request_id="r", submitted_at=0.0)
    turn.streaming = True
    turn.events = list(events)
    if done:
        turn.finished_at = 1.0
    return turn


async def test_a_replay_gets_every_stored_event_in_batches_from_its_start() -> None:
    turn = turn_with(list(range(100)), done=True)
    batches = [(seq, chunks) async for seq, chunks in read_batches(turn, 10, live=False)]
    assert [seq for seq, _ in batches] == [11, 11 + BATCH_MAX]
    assert [c for _, chunks in batches for c in chunks] == list(range(10, 100))
    assert turn.acked == 0  # a replay does not pace the agent


async def test_a_live_reader_takes_what_piled_up_and_acknowledges_it() -> None:
    turn = turn_with([], done=False)
    got: list[tuple[int, list[Any]]] = []

    async def reader() -> None:
        async for seq, chunks in read_batches(turn):
            got.append((seq, list(chunks)))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            await anyio.wait_all_tasks_blocked()
            assert isinstance(turn.events, list)
            turn.events.extend(["a", "b", "c"])  # three chunks before the reader runs
            notify(turn)
            await anyio.wait_all_tasks_blocked()
            assert got == [(1, ["a", "b", "c"])]
            assert turn.acked == 3
            turn.events.append("d")
            turn.finished_at = 1.0
            notify(turn)
    assert got == [(1, ["a", "b", "c"]), (4, ["d"])]
