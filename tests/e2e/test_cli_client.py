"""``ppio-sandbox-cli agent|session ...`` against a real orchestrator subprocess.

One orchestrator (``ppio-sandbox-cli serve`` with the ``echo`` template and
an HMAC key) serves the whole module. Most commands run in-process through
``main(argv)`` with stdout and stderr captured, each on both anyio backends
(``--backend``); a few run the installed ``ppio-sandbox-cli`` script in a
subprocess, which proves the entry point, live streaming and Ctrl-C.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from ppio_sandbox.client._agent_yaml import replace_status
from ppio_sandbox.client._cli import Output
from ppio_sandbox.orchestrator.cli import main
from tests.e2e.helpers import refused_port
from tests.e2e.test_orchestrator_serve import ServeProcess

ROOT = Path(__file__).resolve().parents[2]
ECHO = ROOT / "tests" / "orchestrator" / "templates" / "echo"
BROKEN = Path(__file__).resolve().parent / "orchestrator_templates" / "broken_inprocess"
SCRIPT = Path(sys.executable).with_name("ppio-sandbox-cli")
KEY, SECRET = "k1", "s3cret"
BACKENDS = ("asyncio", "trio")

AGENT_YAML = """\
# An agent deployed by the CLI tests.
apiVersion: v1
kind: Agent
metadata:
  name: {name}  # the agent's name
  version: "2.0.0"
spec:
  entrypoint: agent.py   # relative to this file
  runtime:
    timeout: 5
  sandbox:
    kind: inprocess
# the end
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    root = tmp_path_factory.mktemp("cli-serve")
    args = ("--template", str(ECHO), "--api-key", f"cli:{KEY}:{SECRET}", "--log-level", "WARNING")
    with ServeProcess(root / "work", *args, data_dir=root / "data", tcp="127.0.0.1") as served:
        yield served


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def json_lines(self) -> list[Any]:
        return [json.loads(line) for line in self.out.splitlines()]


def cli(
    capsys: pytest.CaptureFixture[str],
    server: ServeProcess,
    command: str,
    *extra: str,
    backend: str = "asyncio",
    auth: bool = True,
) -> Ran:
    """Run ``ppio-sandbox-cli <command> <extra...>`` in-process against ``server``.

    ``command`` is split as a shell would; ``extra`` is appended as it is.
    The server's URL and key are added unless the command names its own.
    """
    args = [*shlex.split(command), *extra, "--backend", backend]
    if "--base-url" not in args:
        args += ["--base-url", server.base_url]
    if auth:
        args += ["--api-key", KEY, "--api-secret", SECRET]
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return Ran(code, out, err)


def agent_dir(tmp_path: Path, source: Path, name: str, text: str | None = None) -> Path:
    """A copy of the template ``source`` named ``name`` (fresh content, so a real build)."""
    target = tmp_path / name
    shutil.copytree(source, target)
    agent_file = target / ".ppio-agent.yaml"
    agent_file.write_text(text if text is not None else AGENT_YAML.format(name=name))
    return agent_file


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def scrubbed_env(**extra: str) -> dict[str, str]:
    """The environment minus PPIO_* and PYTHONUNBUFFERED (so flushing is the CLI's doing)."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("PPIO_") and k != "PYTHONUNBUFFERED"
    }
    return {**env, **extra}


# -- agent deploy -------------------------------------------------------------------------------


def test_deploy_shows_progress_writes_status_back_and_lists_the_template(
    capsys: pytest.CaptureFixture[str], server: ServeProcess, tmp_path: Path, backend: str
) -> None:
    name = unique(f"cli-{backend}")
    agent_file = agent_dir(tmp_path, ECHO, name)
    original = agent_file.read_text()

    ran = cli(capsys, server, "agent deploy --json --config", str(agent_file), backend=backend)

    assert ran.code == 0, ran.err
    progress = ran.err.splitlines()
    assert progress[0] == f"packing {agent_file.parent}"
    assert re.fullmatch(r"uploading 2 files, \d+ B to http://127\.0\.0\.1:\d+", progress[1])
    assert re.fullmatch(rf"template {name}-[0-9a-f]{{8}}: deployed \(\d+\.\d s\)", progress[-1])
    report = ran.json()
    template = report["template"]
    assert (template["phase"], template["name"]) == ("deployed", name)
    assert report["comments_kept"] is True
    # The status block is appended; everything the user wrote is kept, comments included.
    text = agent_file.read_text()
    assert text.startswith(original)
    assert text.count("status:") == 1
    status = yaml.safe_load(text)["status"]
    assert status == report["status"]
    assert status["phase"] == "deployed"
    assert status["template_id"] == template["template_id"]
    assert status["build_id"] == template["digest"]
    deployed_at = datetime.fromisoformat(status["last_deployed"]).timestamp()
    assert abs(deployed_at - time.time()) < 120

    listed = cli(capsys, server, "agent list --json", backend=backend).json()["templates"]
    assert {t["template_id"]: t["phase"] for t in listed}[status["template_id"]] == "deployed"

    # Redeploying: the status block is not content, so the same template, already deployed.
    again = cli(capsys, server, "agent deploy --json --config", str(agent_file.parent))
    assert again.code == 0, again.err
    assert again.json()["template"]["template_id"] == status["template_id"]
    assert agent_file.read_text().count("status:") == 1


def test_deploy_of_a_broken_template_fails_with_the_log_tail(
    capsys: pytest.CaptureFixture[str], server: ServeProcess, tmp_path: Path, backend: str
) -> None:
    agent_file = agent_dir(tmp_path, BROKEN, unique(f"broken-{backend}"))
    before = agent_file.read_text()

    ran = cli(capsys, server, "agent deploy --json --config", str(agent_file), backend=backend)

    assert ran.code == 1
    assert ran.json()["template"]["phase"] == "failed"
    lines = ran.err.splitlines()
    assert re.search(r": failed \(\d+\.\d s\)$", ran.err, re.MULTILINE), ran.err
    assert any(line.startswith("build log (last ") for line in lines), ran.err
    assert any("broken-at-import on purpose" in line for line in lines), ran.err
    assert lines[-1].startswith("error: ValidationError: template broken-"), ran.err
    assert agent_file.read_text() == before  # no status for a failed deploy


def test_deploy_no_wait_returns_once_uploaded(
    capsys: pytest.CaptureFixture[str], server: ServeProcess, tmp_path: Path
) -> None:
    agent_file = agent_dir(tmp_path, ECHO, unique("cli-nowait"))
    ran = cli(capsys, server, "agent deploy --no-wait --config", str(agent_file))
    assert ran.code == 0, ran.err
    assert re.fullmatch(r"uploaded cli-nowait-\w+-[0-9a-f]{8}: \w+ \(not waiting\)\n", ran.out)


def test_deploy_of_a_missing_config_is_one_line(
    capsys: pytest.CaptureFixture[str], server: ServeProcess, tmp_path: Path
) -> None:
    missing = tmp_path / "nope.yaml"
    ran = cli(capsys, server, "agent deploy --config", str(missing))
    assert ran.code == 1
    expected = (
        f"error: ValidationError: {missing}: no such file (--config names a .ppio-agent.yaml)"
    )
    assert ran.err == expected + "\n"


# -- agent invoke -------------------------------------------------------------------------------


def test_invoke_sends_the_input_as_prompt(
    capsys: pytest.CaptureFixture[str], server: ServeProcess, backend: str
) -> None:
    ran = cli(
        capsys, server, "agent invoke --template-id echo --input hello --json", backend=backend
    )
    assert ran.code == 0, ran.err
    reply = ran.json()
    assert reply["status"] == "success"
    assert (reply["result"]["echo"], reply["result"]["turn"]) == ("hello", 1)
    assert reply["metadata"]["session_id"].startswith("oneshot-")

    body = """'{"prompt": "p", "action": "echo"}'"""
    human = cli(capsys, server, f"agent invoke --template-id echo --input-json {body}")
    assert human.code == 0, human.err
    assert json.loads(human.out)["echo"] == "p"  # the result alone, indented


def test_invoke_in_a_session_across_turns_then_list_and_close_it(
    capsys: pytest.CaptureFixture[str], server: ServeProcess, backend: str
) -> None:
    sid = unique(f"cli-session-{backend}")
    invoke = f"agent invoke --template-id echo --session-id {sid} --json --input"
    turns = [
        cli(capsys, server, invoke, prompt, backend=backend).json()["result"] for prompt in "ab"
    ]
    assert [(t["turn"], t["echo"], t["session_id"]) for t in turns] == [
        (1, "a", sid),
        (2, "b", sid),
    ]

    listed = cli(capsys, server, "session list --json", backend=backend).json()["sessions"]
    mine = {s["session_id"]: s for s in listed}[sid]
    assert (mine["status"], mine["turns"]["ok"]) == ("ready", 2)
    header, *rows = cli(capsys, server, "session list", backend=backend).out.splitlines()
    assert " ".join(header.split()) == "SESSION ID TEMPLATE STATUS TURNS AGE IDLE EXPIRES IN"
    assert [sid, mine["template_id"], "ready", "2"] in [row.split()[:4] for row in rows]

    closed = cli(capsys, server, "session close --json", sid, backend=backend)
    assert closed.code == 0, closed.err
    assert closed.json() == {"session_id": sid, "closed": True, "status": "closed"}
    listed = cli(capsys, server, "session list --json", backend=backend).json()["sessions"]
    assert sid not in {s["session_id"] for s in listed}

    again = cli(capsys, server, "session close", sid, backend=backend)
    assert (again.code, again.out) == (1, "")
    assert re.fullmatch(rf"error: SessionNotFoundError: .*{sid}.*\n", again.err), again.err


def test_invoke_stream_prints_every_chunk(
    capsys: pytest.CaptureFixture[str], server: ServeProcess, backend: str
) -> None:
    body = """'{"action": "stream", "count": 4}'"""
    stream = f"agent invoke --template-id echo --stream --input-json {body}"
    ran = cli(capsys, server, stream + " --json", backend=backend)
    assert ran.code == 0, ran.err
    assert ran.json_lines() == [{"i": i} for i in range(4)]
    human = cli(capsys, server, stream, backend=backend)
    assert human.out == "".join(f'{{"i": {i}}}\n' for i in range(4))


def test_agent_list_prints_a_table(
    capsys: pytest.CaptureFixture[str], server: ServeProcess
) -> None:
    ran = cli(capsys, server, "agent list")
    assert ran.code == 0, ran.err
    header, *rows = ran.out.splitlines()
    assert " ".join(header.split()) == "TEMPLATE ID NAME VERSION PHASE SANDBOX UPDATED"
    echo = [row.split() for row in rows if row.split()[1] == "echo"]
    assert [row[2:5] for row in echo] == [["1.0.0", "deployed", "inprocess"]]


# -- errors -------------------------------------------------------------------------------------


def test_errors_are_one_line_naming_the_class(
    capsys: pytest.CaptureFixture[str], server: ServeProcess, backend: str
) -> None:
    def fails(command: str, auth: bool = True) -> str:
        ran = cli(capsys, server, command, backend=backend, auth=auth)
        assert (ran.code, ran.out) == (1, ""), ran
        assert ran.err.count("\n") == 1, ran.err
        assert "Traceback" not in ran.err
        return ran.err

    unknown = fails("agent invoke --template-id nope --input x")
    assert re.fullmatch(r"error: TemplateNotFoundError: .*'nope'.*\n", unknown)
    wrong_key = fails("agent list --api-key not-a-key", auth=False)
    assert wrong_key.startswith("error: AuthenticationError: ")
    started = time.monotonic()
    sleep = """'{"action": "sleep", "seconds": 3}'"""
    slow = fails(f"agent invoke --template-id echo --timeout 0.3 --input-json {sleep}")
    assert slow.startswith("error: InvocationTimeoutError: ")
    assert time.monotonic() - started < 2.5
    with refused_port() as port:
        nobody = f"http://127.0.0.1:{port}"
        unreachable = fails(f"agent list --base-url {nobody}")
    assert unreachable.startswith(f"error: ServiceUnavailableError: cannot reach {nobody}")
    bad_url = fails("agent list --base-url ftp://x")
    assert bad_url.startswith("error: ValueError: base_url must start with http://")


@pytest.mark.parametrize(
    "command",
    [
        "agent invoke --input x",  # no --template-id
        "agent invoke --template-id echo",  # no input
        "agent invoke --template-id echo --input x --input-json {}",
        "agent invoke --template-id echo --input-json [1]",
        "agent invoke --template-id echo --input x --timeout -1",
        "session close",
        "agent list --backend curio",
        "agent",
    ],
)
def test_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], server: ServeProcess, command: str
) -> None:
    ran = cli(capsys, server, command)
    assert (ran.code, ran.out) == (2, "")
    assert "usage: ppio-sandbox-cli" in ran.err


# -- the installed entry point, in subprocesses -------------------------------------------------


def test_entry_point_reads_the_environment(server: ServeProcess) -> None:
    env = scrubbed_env(PPIO_BASE_URL=server.base_url, PPIO_API_KEY=KEY, PPIO_API_SECRET=SECRET)
    done = subprocess.run(
        [str(SCRIPT), "agent", "list", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    names = {t["name"] for t in json.loads(done.stdout)["templates"]}
    assert "echo" in names


def _start_stream(
    server: ServeProcess, backend: str, count: int, delay: float
) -> subprocess.Popen[str]:
    body = json.dumps({"action": "stream", "count": count, "delay": delay})
    env = scrubbed_env(PPIO_BASE_URL=server.base_url, PPIO_API_KEY=KEY, PPIO_API_SECRET=SECRET)
    return subprocess.Popen(
        [
            str(SCRIPT),
            "agent",
            "invoke",
            "--template-id",
            "echo",
            "--input-json",
            body,
            "--stream",
            "--json",
            "--backend",
            backend,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # A shell may start tests with SIGINT ignored, which children inherit.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def test_stream_chunks_reach_stdout_as_they_arrive(server: ServeProcess) -> None:
    proc = _start_stream(server, "asyncio", count=3, delay=0.4)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        first_at = time.monotonic()
        out, err = proc.communicate(timeout=20)
        ended_at = time.monotonic()
    finally:
        proc.kill()
        proc.wait(10)
    assert proc.returncode == 0, err
    assert [json.loads(line) for line in [first, *out.splitlines()]] == [{"i": i} for i in range(3)]
    # Chunk 0 was printed while chunks 1 and 2 were still 0.8 s away.
    assert ended_at - first_at > 0.6


@pytest.mark.parametrize("loop", BACKENDS)
def test_ctrl_c_exits_130_without_a_traceback_and_ends_the_session(
    capsys: pytest.CaptureFixture[str], server: ServeProcess, loop: str
) -> None:
    proc = _start_stream(server, loop, count=100, delay=0.1)
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline()) == {"i": 0}  # the turn is running
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
        proc.wait(10)
    assert proc.returncode == 130, err
    assert err == "interrupted\n"
    # The one-shot session was closed on the way out.
    listed = cli(capsys, server, "session", "list", "--json").json()["sessions"]
    assert not [s for s in listed if s["session_id"].startswith("oneshot-")], listed


def test_a_reader_that_stops_early_ends_the_command_quietly(server: ServeProcess) -> None:
    proc = _start_stream(server, "asyncio", count=100_000, delay=0.0)  # like `... | head -1`
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline()) == {"i": 0}
        proc.stdout.close()
        assert proc.wait(20) == 1
        assert proc.stderr is not None
        assert proc.stderr.read() == ""
    finally:
        proc.kill()
        proc.wait(10)


def test_serve_does_not_import_the_client() -> None:
    code = (
        "import sys; from ppio_sandbox.orchestrator import cli; "
        "cli.build_parser(['serve', '--port', '1']); "
        "print(sorted(m for m in sys.modules if m.startswith('ppio_sandbox.client')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# -- the status block, as text ------------------------------------------------------------------

STATUS = {
    "phase": "deployed",
    "template_id": "a-12345678",
    "last_deployed": "2026-01-01T00:00:00+00:00",
}


def test_status_block_is_replaced_where_it_stands_keeping_comments() -> None:
    text = (
        "apiVersion: v1  # keep\nstatus:\n  phase: failed\n  # old note\n  build_id: x\n"
        "# about the spec\nspec:\n  entrypoint: agent.py\n"
    )
    edited, kept = replace_status(text, STATUS)
    assert kept
    assert edited == (
        "apiVersion: v1  # keep\nstatus:\n  phase: deployed\n  template_id: a-12345678\n"
        "  last_deployed: '2026-01-01T00:00:00+00:00'\n"
        "# about the spec\nspec:\n  entrypoint: agent.py\n"
    )


def test_status_is_appended_to_a_file_without_a_final_newline() -> None:
    edited, kept = replace_status("kind: Agent", STATUS)
    assert kept
    assert edited.startswith("kind: Agent\nstatus:\n  phase: deployed\n")


def test_a_flow_style_document_is_rewritten_from_its_content() -> None:
    edited, kept = replace_status("{kind: Agent, status: {phase: x}}  # gone\n", STATUS)
    assert not kept
    assert yaml.safe_load(edited) == {"kind": "Agent", "status": STATUS}


def test_progress_is_redrawn_in_place_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    out = Output(json_mode=False)
    out.status("t: pending (0.0 s)", changed=True)
    out.status("t: pending (0.5 s)", changed=False)
    out.note("done")
    assert terminal.getvalue() == "\r\x1b[Kt: pending (0.0 s)\r\x1b[Kt: pending (0.5 s)\ndone\n"
