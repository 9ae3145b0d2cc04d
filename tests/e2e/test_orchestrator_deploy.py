"""Deploying templates over HTTP to a ``serve`` subprocess: ``POST /v1/templates``.

An agent directory is packed with ``pack_directory`` and uploaded as
``application/gzip``; the answer is 202 while the orchestrator smoke-tests it
in the background (pending -> building -> deployed | failed). Ids are
``<metadata.name>-<first 8 hex of the content digest>``.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import shutil
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ppio_sandbox.orchestrator._policy import UPLOADS_AS_PROCESS
from ppio_sandbox.orchestrator.templates import content_hash, pack_directory
from tests.e2e.test_orchestrator_serve import TEMPLATES, ServeProcess, read_proc, serving

GZIP = {"Content-Type": "application/gzip"}
DEPLOY_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    work = tmp_path_factory.mktemp("deploy")
    with serving(work, data_dir=work / "data") as running:
        yield running


@pytest.fixture
def client(server: ServeProcess) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def copy_template(name: str, dest: Path, *, note: str | None = None) -> Path:
    """A copy of a test template; ``note`` (a comment in agent.py) makes its content unique."""
    target = dest / name
    shutil.copytree(TEMPLATES / name, target)
    if note is not None:
        agent = target / "agent.py"
        agent.write_text(agent.read_text() + f"# {note}\n")
    return target


def upload(client: httpx.Client, data: bytes, **headers: str) -> httpx.Response:
    return client.post("/v1/templates", content=data, headers=headers or GZIP)


def wait_for_phase(client: httpx.Client, template_id: str, timeout: float = DEPLOY_TIMEOUT) -> Any:
    """Poll ``GET /v1/templates/{id}`` until deployed or failed (bounded); the view."""
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(f"/v1/templates/{template_id}")
        assert r.status_code == 200, r.text
        view = r.json()
        if view["phase"] in ("deployed", "failed"):
            return view
        assert view["phase"] in ("pending", "building"), view
        assert time.monotonic() < deadline, f"{template_id} still {view['phase']}"
        time.sleep(0.02)


def error_of(response: httpx.Response, status: int, error_type: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == error_type, error
    return str(error["message"])


def listed(client: httpx.Client) -> set[str]:
    return {t["template_id"] for t in client.get("/v1/templates").json()["templates"]}


def test_an_upload_deploys_under_a_content_addressed_id(
    client: httpx.Client, server: ServeProcess, tmp_path: Path
) -> None:
    src = copy_template("worker_inprocess", tmp_path, note="content-addressed")
    data = pack_directory(src)
    digest = content_hash(data)

    r = upload(client, data)
    assert r.status_code == 202, r.text
    view = r.json()
    assert view["phase"] in ("pending", "building")
    assert re.fullmatch(r"worker-inprocess-[0-9a-f]{8}", view["template_id"])
    assert view["template_id"] == f"worker-inprocess-{digest[:8]}"
    assert view["digest"] == digest
    template_id = view["template_id"]

    view = wait_for_phase(client, template_id)
    assert view["phase"] == "deployed", view
    assert view["error"] is None
    assert view["build_log"].startswith("smoke test passed: /ping answered")
    assert template_id in listed(client)
    # An upload asking for inprocess runs as a process sandbox (serve has no --trust-uploads).
    assert view["sandbox"] == {
        "kind": "process",
        "requested": "inprocess",
        "reason": UPLOADS_AS_PROCESS,
    }

    r = client.post("/v1/sessions", json={"template_id": template_id})
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    assert r.json()["sandbox"]["kind"] == "process"
    r = client.post(f"/v1/sessions/{sid}/invocations", json={"prompt": "uploaded"})
    assert r.status_code == 200, r.text
    assert r.json()["result"]["echo"] == "uploaded"
    assert r.json()["result"]["pid"] != server.pid

    # The same content again, even re-packed after touching every file, is the
    # same template: same id, already deployed, not rebuilt.
    for path in src.rglob("*"):
        os.utime(path, (1_000_000, 1_000_000))
    again = upload(client, pack_directory(src))
    assert again.status_code == 202, again.text
    assert again.json()["template_id"] == template_id
    assert again.json()["phase"] == "deployed"
    assert again.json()["created_at"] == view["created_at"]

    # An archive of the folder itself (not of its contents) is the same content too.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src, arcname="my-agent")
    assert upload(client, buf.getvalue()).json()["template_id"] == template_id

    # Changed content is a new template of the same name; the old one keeps serving.
    (src / "agent.py").write_text((src / "agent.py").read_text() + "# changed\n")
    changed = upload(client, pack_directory(src))
    assert changed.status_code == 202, changed.text
    new_id = changed.json()["template_id"]
    assert new_id != template_id
    assert new_id.startswith("worker-inprocess-")
    assert wait_for_phase(client, new_id)["phase"] == "deployed"
    assert client.get(f"/v1/templates/{template_id}").json()["phase"] == "deployed"
    r = client.post(f"/v1/sessions/{sid}/invocations", json={"prompt": "old still serves"})
    assert r.status_code == 200, r.text
    assert client.delete(f"/v1/sessions/{sid}").status_code == 200


@pytest.mark.parametrize("name", ["broken_inprocess", "broken_process"])
def test_a_template_that_raises_at_import_ends_failed_with_the_error(
    client: httpx.Client, name: str
) -> None:
    r = upload(client, pack_directory(TEMPLATES / name))
    assert r.status_code == 202, r.text
    template_id = r.json()["template_id"]
    assert r.json()["phase"] in ("pending", "building")

    view = wait_for_phase(client, template_id)
    assert view["phase"] == "failed", view
    for text in (view["error"], view["build_log"]):
        assert "RuntimeError: broken-at-import on purpose" in text, view
    if name == "broken_process":  # the process's own output: its traceback
        assert "Traceback (most recent call last)" in view["build_log"], view
        assert view["error"].startswith("SandboxCrashedError: sandbox process ")

    r = client.post("/v1/sessions", json={"template_id": template_id})
    assert error_of(r, 404, "TemplateNotFoundError") == (
        f"template {template_id} is failed, not deployed"
    )


# -- archives the orchestrator must refuse ---------------------------------------------------------

AGENT_YAML = b"""apiVersion: v1
kind: Agent
metadata: {name: evil}
spec: {entrypoint: agent.py}
"""
AGENT_PY = (
    b"from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp\napp = PPIOAgentRuntimeApp()\n"
)


def tar_gz(*extra: tarfile.TarInfo, base: bool = True, yaml: bytes = AGENT_YAML) -> bytes:
    """A tar.gz of a valid agent (unless ``base=False``) plus hand-made ``extra`` entries."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        files = [(".ppio-agent.yaml", yaml), ("agent.py", AGENT_PY)] if base else []
        for name, content in files:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        for info in extra:
            content = b"print('escaped')\n" if info.isreg() else b""
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content) if content else None)
    return buf.getvalue()


def entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


BAD_ARCHIVES = [
    pytest.param(b"this is not an archive", "archive: not a valid tar.gz", id="garbage"),
    pytest.param(gzip.compress(b"x" * 4096), "archive: not a valid tar.gz", id="gzip-of-garbage"),
    pytest.param(tar_gz()[:-40], "archive: not a valid tar.gz", id="truncated"),
    pytest.param(tar_gz(entry("../escape.py")), "'..' would leave the destination", id="dotdot"),
    pytest.param(tar_gz(entry("/tmp/escape.py")), "absolute paths are not allowed", id="absolute"),
    pytest.param(
        tar_gz(entry("etc", tarfile.SYMTYPE, "/etc")), "points outside", id="symlink-absolute"
    ),
    pytest.param(
        tar_gz(entry("up", tarfile.SYMTYPE, "../..")), "points outside", id="symlink-climbing"
    ),
    pytest.param(
        tar_gz(entry("d", tarfile.SYMTYPE, "."), entry("d/../../escape.py")),
        "'..' would leave the destination",
        id="through-symlink",
    ),
    pytest.param(
        tar_gz(entry("passwd", tarfile.LNKTYPE, "/etc/passwd")),
        "absolute paths are not allowed",
        id="hardlink-out",
    ),
    pytest.param(
        tar_gz(entry("fifo", tarfile.FIFOTYPE)),
        "only files, directories and links are allowed",
        id="fifo",
    ),
    pytest.param(
        tar_gz(entry("agent.py")), "archive entry 'agent.py' appears twice", id="duplicate"
    ),
    pytest.param(tar_gz(base=False), ".ppio-agent.yaml: not found at the top", id="no-agent-yaml"),
    pytest.param(tar_gz(yaml=AGENT_YAML + b"bogus: 1\n"), "bogus: unknown field", id="bad-spec"),
]


@pytest.mark.parametrize(("data", "message"), BAD_ARCHIVES)
def test_an_unsafe_or_garbage_archive_is_400(
    server: ServeProcess, client: httpx.Client, data: bytes, message: str
) -> None:
    before = listed(client)
    files_before = sorted(p.name for p in (server.data_dir / "templates").iterdir())
    r = upload(client, data)
    assert message in error_of(r, 400, "ValidationError")
    assert listed(client) == before
    assert sorted(p.name for p in (server.data_dir / "templates").iterdir()) == files_before
    assert list((server.data_dir / "tmp").iterdir()) == []  # the unpacking area is cleaned
    assert not (server.data_dir / "escape.py").exists()
    assert not Path("/tmp/escape.py").exists()


def test_an_upload_must_be_a_non_empty_archive(client: httpx.Client) -> None:
    data = pack_directory(TEMPLATES / "worker_inprocess")
    r = upload(client, data, **{"Content-Type": "application/json"})
    assert error_of(r, 400, "ValidationError").startswith(
        "upload the agent directory as a tar.gz archive"
    )
    assert error_of(upload(client, b""), 400, "ValidationError") == "empty archive"


def test_delete_removes_the_template_its_files_and_its_sessions(
    server: ServeProcess, client: httpx.Client, tmp_path: Path
) -> None:
    src = copy_template("worker_inprocess", tmp_path, note="to be deleted")
    r = upload(client, pack_directory(src))
    template_id, digest = r.json()["template_id"], r.json()["digest"]
    assert wait_for_phase(client, template_id)["phase"] == "deployed"
    sid = client.post("/v1/sessions", json={"template_id": template_id}).json()["session_id"]
    assert (server.data_dir / "templates" / digest).is_dir()

    r = client.delete(f"/v1/templates/{template_id}")
    assert r.status_code == 200, r.text
    assert r.json() == {"template_id": template_id, "deleted": True}

    message = error_of(client.get(f"/v1/templates/{template_id}"), 404, "TemplateNotFoundError")
    assert message == f"no template or agent named {template_id!r}"
    assert template_id not in listed(client)
    assert not (server.data_dir / "templates" / digest).exists()
    message = error_of(client.get(f"/v1/sessions/{sid}"), 404, "SessionNotFoundError")
    assert message == f"session {sid} closed: its template was deleted"
    error_of(client.delete(f"/v1/templates/{template_id}"), 404, "TemplateNotFoundError")
    r = client.post("/v1/sessions", json={"template_id": template_id})
    error_of(r, 404, "TemplateNotFoundError")


def test_a_deployed_template_survives_a_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    src = copy_template("worker_process", tmp_path, note="survives restarts")
    with serving(tmp_path / "first", data_dir=data_dir) as first, first.client() as client:
        r = upload(client, pack_directory(src))
        assert r.status_code == 202, r.text
        template_id = r.json()["template_id"]
        assert re.fullmatch(r"worker-process-[0-9a-f]{8}", template_id)
        deployed = wait_for_phase(client, template_id)
        assert deployed["phase"] == "deployed", deployed
    assert first.proc is not None
    assert first.proc.returncode == 0, first.log()

    with serving(tmp_path / "second", data_dir=data_dir) as second, second.client() as client:
        assert template_id in listed(client)
        view = client.get(f"/v1/templates/{template_id}").json()
        assert view == deployed  # phase, digest, times and log: all as stored
        r = client.post("/v1/sessions", json={"template_id": "worker-process"})  # by name
        assert r.status_code == 201, r.text
        sid, pid = r.json()["session_id"], r.json()["sandbox"]["pid"]
        walled = r.json()["sandbox"]["isolation"]["namespaces"]
        assert r.json()["template_id"] == template_id
        r = client.post(f"/v1/sessions/{sid}/invocations", json={"prompt": "after restart"})
        assert r.status_code == 200, r.text
        assert r.json()["result"]["echo"] == "after restart"
        # Behind bubblewrap the agent is pid 2 of its own namespace, below bwrap's pid.
        assert r.json()["result"]["pid"] == (2 if walled else pid)
        proc = read_proc(pid)
        assert proc is not None
        assert (proc.cwd or "").startswith(str(data_dir / "sandboxes"))
        assert upload(client, pack_directory(src)).json()["template_id"] == template_id
