"""Process sandboxes through the orchestrator's API: crashes, restarts, pause, close."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from ppio_sandbox.orchestrator.session_core import SessionLimits

from .conftest import orchestrator

pytestmark = pytest.mark.anyio

TEMPLATES = ("echo_process",)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


async def _pid(o: Any, sid: str) -> int:
    """The sandbox's host pid (bwrap's when walled: the agent is pid 2 of its namespace)."""
    r = await o.invoke(sid, {})
    assert r.status_code == 200, r.text
    view = (await o.client.get(f"/v1/sessions/{sid}")).json()
    return int(view["sandbox"]["pid"])


async def test_kill_9_mid_turn_is_502_at_once_and_the_next_turn_runs_on_a_restart(
    tmp_path: Path,
) -> None:
    async with orchestrator(tmp_path, templates=TEMPLATES) as o:
        sid = await o.session("echo-process")
        pid = await _pid(o, sid)
        reply: dict[str, Any] = {}

        async def slow() -> None:
            r = await o.invoke(sid, {"action": "sleep", "seconds": 10})
            reply["status"], reply["body"], reply["at"] = r.status_code, r.json(), time.monotonic()

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow)
            with anyio.fail_after(5):
                while (await o.client.get(f"/v1/sessions/{sid}")).json()["status"] != "busy":
                    await anyio.sleep(0.01)
            await anyio.sleep(0.1)  # let the request reach the agent
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
        assert reply["status"] == 502
        assert reply["body"]["error"]["type"] == "SandboxCrashedError"
        assert reply["at"] - killed_at < 1.0
        new_pid = await _pid(o, sid)
        assert new_pid != pid
        view = (await o.client.get(f"/v1/sessions/{sid}")).json()
        assert view["restarts"] == 1
        assert "ppio_sandbox_crashes_total" in (await o.client.get("/metrics")).text


async def test_a_crash_loop_fails_the_session_and_answers_every_caller(tmp_path: Path) -> None:
    limits = SessionLimits(restart_budget=2, restart_window=60)
    async with orchestrator(tmp_path, templates=TEMPLATES, limits=limits) as o:
        sid = await o.session("echo-process")
        replies = [await o.invoke(sid, {"action": "crash"}) for _ in range(3)]
        assert [r.status_code for r in replies] == [502, 502, 502]
        # The caller whose crash spent the restart budget hears that the session failed.
        assert "restart" not in replies[1].json()["error"]["message"]
        last = replies[2].json()["error"]["message"]
        assert f"session {sid} failed: its sandbox crashed more than 2 times" in last, last
        assert "this turn's crash: sandbox process" in last, last
        r = await o.invoke(sid, {})
        assert r.status_code == 404
        assert "crashed" in r.json()["error"]["message"]


async def test_pause_stops_the_process_and_resume_continues(tmp_path: Path) -> None:
    async with orchestrator(tmp_path, templates=TEMPLATES) as o:
        sid = await o.session("echo-process")
        pid = await _pid(o, sid)
        await o.client.post(f"/v1/sessions/{sid}/pause")
        # Paused: frozen (cgroup freezer) or stopped (SIGSTOP); either way ping says so at once.
        with anyio.fail_after(1):
            ping = await o.client.get(f"/v1/sessions/{sid}/ping")
        assert ping.json()["status"] == "Paused"
        assert (await o.client.get(f"/v1/sessions/{sid}")).json()["sandbox"]["paused"] is True
        await o.client.post(f"/v1/sessions/{sid}/resume")
        assert (await _pid(o, sid)) == pid


async def test_close_stops_the_process_and_removes_its_workdir(tmp_path: Path) -> None:
    async with orchestrator(tmp_path, templates=TEMPLATES) as o:
        sid = await o.session("echo-process", env_vars={"GREETING": "hi"})
        pid = await _pid(o, sid)
        env = (await o.invoke(sid, {"action": "env", "keys": ["GREETING", "HOME"]})).json()
        workdir = Path(env["result"]["env"]["HOME"])
        assert env["result"]["env"]["GREETING"] == "hi"
        assert workdir.is_dir()
        await o.client.delete(f"/v1/sessions/{sid}")
        with anyio.fail_after(5):
            while _alive(pid):
                await anyio.sleep(0.02)
        assert not workdir.exists()
