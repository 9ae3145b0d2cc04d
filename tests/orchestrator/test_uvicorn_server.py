"""``serve --server uvicorn``: the same front door on uvicorn (asyncio only)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from ppio_sandbox.orchestrator.server import ServeOptions, run
from tests.e2e.test_orchestrator_serve import serving, template_args

from .conftest import orchestrator

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_sessions_turns_and_streams_on_uvicorn(tmp_path: Path) -> None:
    async with orchestrator(tmp_path, server="uvicorn") as o:
        sid = await o.session()
        for turn in (1, 2):
            r = await o.invoke(sid, {"prompt": "hi"})
            assert r.status_code == 200, r.text
            assert r.json()["result"]["turn"] == turn
        r = await o.invoke(sid, {"action": "stream", "count": 3})
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.text.count("data: ") == 4  # three chunks and the done event
        assert r.text.rstrip().split("\n")[0] == "id: 1"
        assert (await o.client.get("/v1/sessions/nope")).status_code == 404


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_uvicorn_on_trio_is_refused_clearly(tmp_path: Path) -> None:
    options = ServeOptions(bind=f"unix:{tmp_path / 's'}", data_dir=tmp_path, server="uvicorn")
    with pytest.raises(SystemExit, match="uvicorn runs on asyncio only"):
        await run(options, install_signal_handlers=False)


def test_serve_with_uvicorn_drains_on_sigterm_and_exits_0(tmp_path: Path) -> None:
    args = [*template_args("worker_inprocess"), "--server", "uvicorn", "--worker", "asyncio"]
    with serving(tmp_path, *args, data_dir=tmp_path / "data", tcp="127.0.0.1") as server:
        with server.client() as client:
            r = client.post("/v1/sessions", json={"template_id": "worker-inprocess"})
            assert r.status_code == 201, r.text
            sid = r.json()["session_id"]
            r = client.post(f"/v1/sessions/{sid}/invocations", json={"prompt": "x"})
            assert r.json()["result"]["echo"] == "x"
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait(20) == 0, server.log()
    assert "orchestrator stopped" in server.log()
