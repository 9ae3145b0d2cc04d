"""``serve --workers 2``: two worker processes behind one address, and their supervisor.

Real processes on a real TCP port: the kernel spreads new connections over
the workers, so every turn below goes out on a fresh connection and lands
on either worker; the one that does not own the session forwards it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_orchestrator_serve import (
    ServeProcess,
    _wait_for,
    descendants,
    is_alive,
    serving,
    template_args,
)

COUNTER = ("counter",)


def _fresh(server: ServeProcess) -> httpx.Client:
    """A client whose every request opens a new connection (any worker may take it)."""
    limits = httpx.Limits(max_keepalive_connections=0)
    return httpx.Client(base_url=server.base_url, timeout=20, limits=limits)


def _workers_ready(server: ServeProcess, count: int) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        with _fresh(server) as client:
            try:
                view = client.get("/v1/cluster").json()
            except (httpx.TransportError, ValueError):
                return None
        alive = [m for m in view.get("members", []) if m["alive"]]
        return view if len(alive) == count else None

    return _wait_for(ready, 30.0)  # type: ignore[no-any-return]


def _turn(client: httpx.Client, sid: str, tag: str) -> httpx.Response:
    """One turn, retried while its session's worker is being restarted (503 + Retry-After)."""
    deadline = time.monotonic() + 20
    while True:
        r = client.post(
            f"/v1/sessions/{sid}/invocations", json={"tag": tag}, headers={"Idempotency-Key": tag}
        )
        if r.status_code != 503 or time.monotonic() > deadline:
            return r
        assert "retry-after" in r.headers
        time.sleep(0.1)


def _worker_pids(server: ServeProcess) -> dict[int, int]:
    """Worker index -> pid, from the process table."""
    found = {}
    for proc in descendants(server.pid).values():
        if "--worker-index" in proc.cmdline:
            found[int(proc.cmdline[proc.cmdline.index("--worker-index") + 1])] = proc.pid
    return found


def test_two_workers_serve_one_address_and_every_turn_reaches_its_owner(tmp_path: Path) -> None:
    args = [*template_args(*COUNTER), "--workers", "2", "--durability", "turn"]
    with serving(tmp_path, *args, data_dir=tmp_path / "data", tcp="127.0.0.1") as server:
        view = _workers_ready(server, 2)
        assert view["placement"] == "WorkerSet"
        with _fresh(server) as client:
            sids = []
            for _ in range(12):
                r = client.post("/v1/sessions", json={"template_id": "counter"})
                assert r.status_code == 201, r.text
                sids.append(r.json()["session_id"])
            homes = {sid.rsplit(".", 1)[1] for sid in sids}
            assert homes == {"w0", "w1"}, sids  # both workers took creations

            forwarded = 0
            for round_ in range(1, 4):
                for sid in sids:
                    r = _turn(client, sid, f"{sid}-{round_}")
                    assert r.status_code == 200, r.text
                    assert r.json()["result"]["turn"] == round_  # in order, on one owner
                    owner = r.headers.get("x-ppio-owner")
                    if owner is not None:
                        assert sid.endswith("." + owner)
                        forwarded += 1
            assert forwarded > 0  # some turns landed on the other worker

            # A caller-named session lives on the worker that first used it.
            for turn in (1, 2, 3):
                r = client.post(
                    "/v1/agents/counter/invocations",
                    json={"tag": f"named-{turn}"},
                    headers={"X-PPIO-Session-Id": "chat-named"},
                )
                assert r.status_code == 200, r.text
                assert r.json()["result"]["turn"] == turn

            listed = {s["session_id"] for s in client.get("/v1/sessions").json()["sessions"]}
            assert listed == {*sids, "chat-named"}
            metrics = client.get("/metrics").text
            assert 'ppio_sessions{state="ready"} 13.0' in metrics  # both workers, summed
            r = client.post("/v1/sessions", json={"template_id": "counter", "session_id": sids[0]})
            assert r.status_code == 400  # the generated form is reserved, and it exists

        # kill -9 a worker: it is restarted in its slot; its sessions come back.
        before = _worker_pids(server)
        assert sorted(before) == [0, 1]
        os.kill(before[1], signal.SIGKILL)
        victims = [sid for sid in sids if sid.endswith(".w1")]
        with _fresh(server) as client:
            for sid in victims:
                r = _turn(client, sid, f"{sid}-4")
                assert r.status_code == 200, r.text
                assert r.json()["result"]["turn"] == 4  # --durability turn: nothing lost
        after = _worker_pids(server)
        assert after[0] == before[0]
        assert after[1] != before[1]
        assert "worker 1 (pid" in server.log()
        assert "restarting it" in server.log()

        # SIGTERM: the workers drain, everything exits 0, nothing is left.
        everything = {**descendants(server.pid)}
        server.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        assert server.wait(40) == 0, server.log()
        _wait_for(lambda: not any(is_alive(p) for p in everything.values()), 5.0)

    # The sessions outlive the whole machine's restart, on one worker or two.
    args = [*template_args(*COUNTER), "--durability", "turn"]
    again = serving(tmp_path / "again", *args, data_dir=tmp_path / "data")
    with again as server, server.client() as client:
        kept = next(sid for sid in sids if sid.endswith(".w0"))
        for sid, turns in ((kept, 3), (victims[0], 4)):  # w1's had one turn more
            r = _turn(client, sid, f"{sid}-5")
            assert r.status_code == 200, r.text
            assert r.json()["result"]["turn"] == turns + 1
        r = client.post(
            "/v1/agents/counter/invocations",
            json={},
            headers={"X-PPIO-Session-Id": "chat-named"},
        )
        assert r.json()["result"]["turn"] == 4


def test_workers_auto_uses_every_usable_core(tmp_path: Path) -> None:
    args = [*template_args(*COUNTER), "--workers", "auto"]
    with serving(tmp_path, *args, data_dir=tmp_path / "data", tcp="127.0.0.1") as server:
        cores = len(os.sched_getaffinity(0))
        if cores == 1:
            pytest.skip("one usable core: --workers auto is a single worker")
        view = _workers_ready(server, cores)
        assert len(view["members"]) == cores
