"""The access log: one INFO line per ``/v1`` request on ``ppio_sandbox.orchestrator.access``,
and ``serve --log-format text|json``."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx
import pytest

from ppio_sandbox.orchestrator.server import JsonFormatter

from .conftest import TEMPLATES, orchestrator

ROOT = Path(__file__).resolve().parents[2]
ACCESS = "ppio_sandbox.orchestrator.access"
FIELDS = ("method", "path", "status", "session_id", "request_id", "duration_ms")


def _access(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == ACCESS]


@pytest.mark.anyio
async def test_one_line_per_request_with_its_fields(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, ACCESS)
    async with orchestrator(tmp_path) as o:
        created = await o.client.post("/v1/sessions", json={"template_id": "echo"})
        sid = created.json()["session_id"]
        ok = await o.invoke(sid, {"action": "sleep", "seconds": 0.2})
        failed = await o.invoke(sid, {"action": "fail"}, **{"X-PPIO-Request-Id": "req-mine"})
        async with o.client.stream(
            "POST", f"/v1/sessions/{sid}/invocations", json={"action": "stream", "delay": 0.05}
        ) as streamed:
            chunks = [line async for line in streamed.aiter_lines() if line.startswith("data:")]
        missing = await o.client.get("/v1/sessions/nope")
        for path in ("/ping", "/healthz", "/metrics"):  # probes and scrapes are not logged
            assert (await o.client.get(path)).status_code == 200
        with anyio.fail_after(5):
            while len(_access(caplog)) < 5:  # a line is written once its reply has gone
                await anyio.sleep(0.01)
        await anyio.sleep(0.05)
    records = _access(caplog)
    assert [(r.method, r.path, r.status) for r in records] == [  # type: ignore[attr-defined]
        ("POST", "/v1/sessions", 201),
        ("POST", f"/v1/sessions/{sid}/invocations", 200),
        ("POST", f"/v1/sessions/{sid}/invocations", 500),
        ("POST", f"/v1/sessions/{sid}/invocations", 200),
        ("GET", "/v1/sessions/nope", 404),
    ]
    create, turn, failure, stream, unknown = records
    for record in records:
        assert record.levelno == logging.INFO
        assert all(hasattr(record, field) for field in FIELDS)
        assert record.getMessage() == (
            f"{record.method} {record.path} {record.status} {record.duration_ms:.1f}ms"  # type: ignore[attr-defined]
        )
    assert create.session_id is None  # type: ignore[attr-defined]
    assert turn.session_id == sid  # type: ignore[attr-defined]
    assert turn.request_id == ok.headers["x-ppio-request-id"]  # type: ignore[attr-defined]
    assert turn.duration_ms >= 200  # type: ignore[attr-defined]
    assert failure.request_id == "req-mine" == failed.headers["x-ppio-request-id"]  # type: ignore[attr-defined]
    assert len(chunks) == 6  # five chunks and the done event
    assert stream.duration_ms >= 250  # type: ignore[attr-defined]  # the whole stream
    assert stream.session_id == sid  # type: ignore[attr-defined]
    assert missing.status_code == 404
    assert unknown.session_id == "nope"  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_nothing_is_logged_below_info(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, ACCESS)
    async with orchestrator(tmp_path) as o:
        sid = await o.session()
        assert (await o.invoke(sid, {})).status_code == 200
    assert _access(caplog) == []


def test_json_formatter_fields() -> None:
    formatter = JsonFormatter(worker=1)
    record = logging.LogRecord("ppio_sandbox.x", logging.WARNING, __file__, 1, "a %s", ("b",), None)
    record.session_id = "s1"
    record.odd = object()  # not JSON: written as text
    line = json.loads(formatter.format(record))
    assert line["message"] == "a b"
    assert line["level"] == "WARNING"
    assert line["logger"] == "ppio_sandbox.x"
    assert line["worker"] == 1
    assert line["session_id"] == "s1"
    assert line["odd"].startswith("<object object")
    assert line["time"].endswith("+00:00")
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    assert "ValueError: boom" in json.loads(formatter.format(record))["exc_info"]


# -- serve --log-format ----------------------------------------------------------------------------


@contextmanager
def _serve(tmp_path: Path, *args: str) -> Iterator[tuple[httpx.Client, Path]]:
    """``ppio-sandbox-cli serve`` on a Unix socket, its stderr in a file; SIGTERM at the end."""
    sock = tmp_path / "serve.sock"
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "ppio_sandbox.orchestrator.cli", "serve", "--bind"]
    cmd += [f"unix:{sock}", "--data-dir", str(tmp_path / "data")]
    cmd += ["--template", str(TEMPLATES / "echo"), *args]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT
        )
    transport = httpx.HTTPTransport(uds=str(sock))
    try:
        with httpx.Client(transport=transport, base_url="http://o", timeout=10) as client:
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, log.read_text()
                try:
                    if client.get("/ping").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            yield client, log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def _turn(client: httpx.Client) -> tuple[str, str]:
    sid = client.post("/v1/sessions", json={"template_id": "echo"}).json()["session_id"]
    r = client.post(f"/v1/sessions/{sid}/invocations", json={"prompt": "hi"})
    assert r.status_code == 200, r.text
    return sid, r.headers["x-ppio-request-id"]


def test_serve_log_format_json(tmp_path: Path) -> None:
    with _serve(tmp_path, "--log-format", "json") as (client, log):
        sid, rid = _turn(client)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert lines, "serve logged nothing"
    for line in lines:  # every line is one JSON object
        assert {"time", "level", "logger", "message"} <= set(line), line
    turns = [x for x in lines if x["logger"] == ACCESS and x["path"].endswith("/invocations")]
    assert len(turns) == 1
    turn = turns[0]
    assert turn["level"] == "INFO"
    assert turn["method"] == "POST"
    assert turn["path"] == f"/v1/sessions/{sid}/invocations"
    assert turn["status"] == 200
    assert turn["session_id"] == sid
    assert turn["request_id"] == rid
    assert isinstance(turn["duration_ms"], float)
    assert turn["message"] == f"POST {turn['path']} 200 {turn['duration_ms']:.1f}ms"
    assert any(x["message"].startswith("orchestrator listening on") for x in lines)


def test_serve_log_format_text(tmp_path: Path) -> None:
    with _serve(tmp_path) as (client, log):  # text is the default
        sid, rid = _turn(client)
    access = [line for line in log.read_text().splitlines() if f" {ACCESS}: " in line]
    turns = [line for line in access if "/invocations" in line]
    assert len(turns) == 1
    assert f"INFO {ACCESS}: POST /v1/sessions/{sid}/invocations 200 " in turns[0]
    assert turns[0].endswith(f"request_id={rid} session_id={sid}")


def test_serve_log_level_warning_silences_the_access_log(tmp_path: Path) -> None:
    with _serve(tmp_path, "--log-level", "WARNING", "--log-format", "json") as (client, log):
        _turn(client)
    assert ACCESS not in log.read_text()


def test_serve_rejects_an_unknown_log_format(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ppio_sandbox.orchestrator.cli", "serve", "--log-format", "xml"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "--log-format" in done.stderr
