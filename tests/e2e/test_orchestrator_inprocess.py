"""``serve`` as a real subprocess: in-process agents cannot stop it; ``--trust-uploads``.

An agent calling ``sys.exit(3)`` at import used to make ``serve`` exit 3, and
during a turn exit 0. Now the first fails its template's build, the second
its turn, and ``serve`` goes on. With ``--trust-uploads`` an uploaded
in-process template runs inside ``serve``'s own process (without it, see
``test_orchestrator_deploy``: a process sandbox).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import httpx

from ppio_sandbox.orchestrator._policy import TRUSTED_UPLOADS
from ppio_sandbox.orchestrator.templates import pack_directory
from tests.e2e.test_orchestrator_serve import TEMPLATES as E2E_TEMPLATES
from tests.e2e.test_orchestrator_serve import serving

TEMPLATES = Path(__file__).resolve().parents[1] / "orchestrator" / "templates"


def wait_for_phase(client: httpx.Client, template_id: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        view = client.get(f"/v1/templates/{template_id}").json()
        if view["phase"] in ("deployed", "failed"):
            return view
        assert time.monotonic() < deadline, f"{template_id} still {view['phase']}"
        time.sleep(0.02)


def test_serve_outlives_agents_that_call_sys_exit_and_trusts_uploads_when_told(
    tmp_path: Path,
) -> None:
    args = ["--trust-uploads"]
    for name in ("exit_at_import", "exit_async"):
        args += ["--template", str(TEMPLATES / name)]
    src = tmp_path / "upload"
    shutil.copytree(E2E_TEMPLATES / "worker_inprocess", src)
    (src / "agent.py").write_text((src / "agent.py").read_text() + "# trusted upload\n")

    with serving(tmp_path / "serve", *args, data_dir=tmp_path / "data") as server:
        with server.client() as client:
            listed = {t["name"]: t for t in client.get("/v1/templates").json()["templates"]}
            failed = listed["exit-at-import"]
            assert failed["phase"] == "failed", failed
            assert failed["error"].endswith("the agent called sys.exit(3)"), failed

            r = client.post("/v1/sessions", json={"template_id": "exit-async"})
            assert r.status_code == 201, r.text
            sid = r.json()["session_id"]
            for how, message in (
                ("exit", "the agent called sys.exit(3)"),
                ("exit_none", "the agent called sys.exit()"),
                ("generator_exit", "the agent raised GeneratorExit"),
            ):
                r = client.post(f"/v1/sessions/{sid}/invocations", json={"how": how})
                assert r.status_code == 500, r.text
                assert r.json()["error"]["message"] == message
                assert server.proc is not None
                assert server.proc.poll() is None, server.log()  # serve did not exit
            r = client.post(f"/v1/sessions/{sid}/invocations", json={})
            assert r.status_code == 200, r.text

            upload = client.post(
                "/v1/templates",
                content=pack_directory(src),
                headers={"Content-Type": "application/gzip"},
            )
            assert upload.status_code == 202, upload.text
            view = wait_for_phase(client, upload.json()["template_id"])
            assert view["phase"] == "deployed", view
            assert view["sandbox"] == {
                "kind": "inprocess",
                "requested": "inprocess",
                "reason": TRUSTED_UPLOADS,
            }
            r = client.post("/v1/sessions", json={"template_id": view["template_id"]})
            assert r.status_code == 201, r.text
            uploaded = r.json()["session_id"]
            r = client.post(f"/v1/sessions/{uploaded}/invocations", json={"prompt": "hi"})
            assert r.status_code == 200, r.text
            assert r.json()["result"]["pid"] == server.pid  # in serve's own process
        assert server.proc.poll() is None, server.log()
