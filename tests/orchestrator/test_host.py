"""The orchestrator host without HTTP: actor activation, passivation, the reaper."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from ppio_sandbox.orchestrator import actor
from ppio_sandbox.orchestrator.actor import wait_started
from ppio_sandbox.orchestrator.host import Orchestrator, OrchestratorConfig

from .conftest import TEMPLATES

pytestmark = pytest.mark.anyio


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[Orchestrator]:
    async with Orchestrator(OrchestratorConfig(data_dir=tmp_path / "data")) as h:
        template = await h.register_directory(TEMPLATES / "echo", "shared")
        assert template.phase == "deployed"
        yield h


async def _turn(h: Orchestrator, sid: str, body: dict[str, object], key: str) -> Any:
    session = h.get_session("default", sid)
    raw = repr(body).encode()
    _, turn = h.submit(
        session, body, key=key, body_hash=hashlib.sha256(raw).digest(), request_id=key
    )
    with anyio.fail_after(5):
        await wait_started(turn)
        while not turn.done:
            await anyio.sleep(0.01)
    assert turn.error is None, turn.error
    return turn.result


async def test_an_idle_session_has_no_task_until_a_turn_arrives(
    host: Orchestrator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(actor, "PASSIVATE_AFTER", 0.05)
    session = await host.create_session("default", "echo")
    assert session.active is False
    result = await _turn(host, session.session_id, {"prompt": "a"}, "k1")
    assert result["turn"] == 1
    with anyio.fail_after(5):
        while session.active:  # the actor passivates after a quiet period
            await anyio.sleep(0.01)
    result = await _turn(host, session.session_id, {"prompt": "b"}, "k2")
    assert result["turn"] == 2  # state survived passivation


async def test_reaper_heap_stays_bounded_under_session_churn(host: Orchestrator) -> None:
    for _ in range(3000):
        session = await host.create_session("default", "echo")
        await host.close_session(session)
    assert len(host.directory) == 0
    assert len(host.sessions._reaper.heap) <= 1024 + 1


async def test_closed_session_is_remembered_with_its_reason(host: Orchestrator) -> None:
    session = await host.create_session("default", "echo")
    await host.close_session(session, "closed by the test")
    with pytest.raises(Exception, match="closed by the test"):
        host.get_session("default", session.session_id)
    with pytest.raises(Exception, match="not found"):
        host.get_session("other-tenant", session.session_id)
