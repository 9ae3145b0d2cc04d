"""Every ``python`` and ``bash`` snippet of README.md runs as pasted, against real servers.

Each such block carries a marker on the line before its fence:
``<!-- snippet: NAME -->`` names the runner below that runs it, and
``<!-- snippet: skip: REASON -->`` says why it is not run (it takes minutes, needs
etcd, or is a set of alternatives); skipped blocks show up as skipped tests with
their reason. A block without a marker, a marker without a runner and a runner
without a block all fail :func:`test_every_runnable_block_has_a_marker_and_a_runner`.
Blocks in other languages (``text``, ``yaml``, the layout) are not code to run.

How they run, with only the port (and ``/tmp``) rewritten, the text otherwise as
the README says:

- agent snippets: written to a file, served by ``python -m
  ppio_sandbox.agent_runtime FILE`` and called over HTTP; the ``curl`` walkthrough
  runs in bash from the repository root, its agent told the port by
  ``$PPIO_AGENT_BIND`` (which the README says wins over ``run()``);
- orchestrator and CLI snippets: ``ppio-sandbox-cli serve`` exactly as the block
  starts it (plus ``--port``), in a fresh directory holding a link to
  ``examples/``, then the rest of the block in bash (``set -e``);
- client snippets: run by Python against a ``serve`` of the assistant template
  that knows the snippet's key, with their base URL's port rewritten.

The shell sees the venv first on ``PATH`` (as ``source .venv/bin/activate`` does) and
no ``PPIO_*`` variables.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.helpers import Server, free_port, running

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent
RUN_LANGUAGES = frozenset({"python", "py", "bash", "sh", "shell", "console"})
MARKER = re.compile(r"<!--\s*snippet:\s*(?P<name>[\w-]+)\s*(?::\s*(?P<reason>.*?))?\s*-->")
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)\s*$")
ORCHESTRATOR_PORT = "8900"


@dataclass(frozen=True)
class Block:
    lang: str
    text: str
    line: int
    """1-based line of the opening fence."""
    heading: str
    name: str | None
    reason: str | None

    def where(self) -> str:
        return f"README.md line {self.line} (```{self.lang} under {self.heading!r})"


def readme_blocks(text: str | None = None) -> list[Block]:
    """Every fenced block of the README, with its heading and marker."""
    lines = (README.read_text(encoding="utf-8") if text is None else text).splitlines()
    blocks: list[Block] = []
    heading = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if fence is None:
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
            i += 1
            continue
        start = i
        i += 1
        body: list[str] = []
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.fullmatch(before.strip())
        blocks.append(
            Block(
                lang=fence["lang"],
                text="\n".join(body) + "\n",
                line=start + 1,
                heading=heading,
                name=marker["name"] if marker else None,
                reason=marker["reason"] if marker else None,
            )
        )
    return blocks


def snippet(name: str) -> str:
    (block,) = [b for b in readme_blocks() if b.name == name]
    return block.text


def shell_env(**extra: str) -> dict[str, str]:
    """The environment of an activated venv, without the caller's PPIO_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPIO_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(VENV_BIN.parent)
    return {**env, **extra}


def run_bash(script: str, cwd: Path, log: Path, env: dict[str, str], timeout: float = 120) -> str:
    """Run ``script`` in bash (``set -e``); its stdout. Anything it leaves running is killed."""
    out = log.with_suffix(".out")
    with out.open("wb") as stdout, log.open("wb") as stderr:
        proc = subprocess.Popen(
            ["bash", "-c", "set -e\n" + script],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,  # its own process group: background jobs included
        )
    try:
        code = proc.wait(timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(5)
    stdout_text = out.read_text(errors="replace")
    assert code == 0, f"exit {code}\nstdout:\n{stdout_text}\nstderr:\n{log.read_text()}"
    return stdout_text


class ServeCommand:
    """A ``ppio-sandbox-cli serve ...`` line of the README, run as written plus ``--port``."""

    def __init__(self, line: str, workdir: Path, *extra: str) -> None:
        command = line.split("#", 1)[0].strip()
        argv = shlex.split(command)
        assert argv[:2] == ["ppio-sandbox-cli", "serve"], line
        self.port = free_port()
        self.argv = [*argv, *extra, "--port", str(self.port)]
        self.workdir = workdir
        self.log = workdir / f"serve-{self.port}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=workdir,
                env=shell_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60) -> ServeCommand:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"serve exited:\n{self.log.read_text()}"
            try:
                if httpx.get(f"{self.base_url}/ping", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"serve not ready after {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)

    def rewrite(self, text: str) -> str:
        """The README's port (8900) as this server's."""
        return text.replace(ORCHESTRATOR_PORT, str(self.port))


def json_documents(text: str) -> list[Any]:
    """The JSON documents printed one after another (curl adds no newline)."""
    decoder = json.JSONDecoder()
    documents, at = [], 0
    while (at := len(text) - len(text[at:].lstrip())) < len(text):
        document, at = decoder.raw_decode(text, at)
        documents.append(document)
    return documents


def workdir_with_examples(path: Path) -> Path:
    """A fresh directory where ``examples/...`` resolves as in the repository root."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    return path


def split_server(block: str) -> tuple[str, str]:
    """The block's first line (a server that runs until stopped) and the rest."""
    first, _, rest = block.partition("\n")
    return first, rest


@pytest.fixture(scope="module")
def orchestrator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeCommand]:
    """The README's ``serve`` of the orchestrator section, which the CLI section uses too."""
    serve_line, _ = split_server(snippet("orchestrator-curl"))
    workdir = workdir_with_examples(tmp_path_factory.mktemp("readme-serve"))
    served = ServeCommand(serve_line, workdir)
    try:
        yield served.wait_ready()
    finally:
        assert served.stop() == 0, served.log.read_text()


@pytest.fixture(scope="module")
def keyed_orchestrator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeCommand]:
    """``serve`` as the client snippet's comment starts it, with the snippet's key."""
    text = snippet("client")
    lines = [line.lstrip("# ").rstrip(" \\") for line in text.splitlines() if line.startswith("#")]
    command = " ".join(line for line in lines if line.startswith(("ppio-sandbox-cli", "--")))
    assert "--api-key your-api-key:your-api-secret" in command, text
    workdir = workdir_with_examples(tmp_path_factory.mktemp("readme-keyed"))
    served = ServeCommand(command, workdir)
    try:
        yield served.wait_ready()
    finally:
        assert served.stop() == 0, served.log.read_text()


# -- the markers --------------------------------------------------------------------------------

RUNNERS: dict[str, Callable[..., None]] = {}


def runner(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    def register(test: Callable[..., None]) -> Callable[..., None]:
        RUNNERS[name] = test
        return test

    return register


def test_every_runnable_block_has_a_marker_and_a_runner() -> None:
    blocks = [b for b in readme_blocks() if b.lang in RUN_LANGUAGES]
    assert blocks, "README.md has no python or bash block?"
    problems = []
    names: list[str] = []
    for block in blocks:
        if block.name is None:
            problems.append(
                f"{block.where()}: no marker; put `<!-- snippet: NAME -->` (and a runner in "
                "tests/e2e/test_readme_snippets.py) or `<!-- snippet: skip: REASON -->` "
                "on the line before the fence"
            )
        elif block.name == "skip":
            if not block.reason:
                problems.append(f"{block.where()}: a skip marker needs its reason")
        elif block.name not in RUNNERS:
            problems.append(f"{block.where()}: no runner named {block.name!r}")
        else:
            names.append(block.name)
    problems += [f"snippet {n!r} is marked twice" for n in sorted(set(names)) if names.count(n) > 1]
    problems += [
        f"runner {n!r} has no block in README.md" for n in sorted(set(RUNNERS) - set(names))
    ]
    assert not problems, "\n".join(problems)


def test_the_marker_reader_sees_fences_headings_and_markers() -> None:
    text = (
        "# Top\n\n<!-- snippet: one -->\n```python\nprint(1)\n```\n\n## Sub\n\n"
        "<!-- snippet: skip: too slow -->\n```bash\nsleep 600\n```\n\n```text\nplain\n```\n"
    )
    one, slow, plain = readme_blocks(text)
    assert (one.lang, one.text, one.heading, one.name, one.reason) == (
        "python",
        "print(1)\n",
        "Top",
        "one",
        None,
    )
    assert (slow.line, slow.heading, slow.name, slow.reason) == (11, "Sub", "skip", "too slow")
    assert (plain.lang, plain.name) == ("text", None)


_SKIPPED = [b for b in readme_blocks() if b.name == "skip" and b.lang in RUN_LANGUAGES]


@pytest.mark.parametrize("block", _SKIPPED, ids=[f"line-{b.line}" for b in _SKIPPED])
def test_blocks_marked_skip_are_skipped_with_their_reason(block: Block) -> None:
    pytest.skip(f"{block.where()}: {block.reason}")


# -- writing an agent ---------------------------------------------------------------------------


def serve_agent_snippet(name: str, tmp_path: Path) -> Server:
    agent = tmp_path / f"{name}.py"
    agent.write_text(snippet(name))
    return Server(agent, env=shell_env())


@runner("agent-simple")
def test_agent_simple(tmp_path: Path) -> None:
    with running(serve_agent_snippet("agent-simple", tmp_path)) as (server,), server.client() as c:
        reply = c.post("/invocations", json={"query": "hello"}, headers={"X-PPIO-Session-Id": "s1"})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["status"] == "success"
        assert body["result"]["response"] == "Processed: hello"
        assert body["result"]["session_id"] == "s1"
        assert body["metadata"]["session_id"] == "s1"
        ping = c.get("/ping").json()
        assert (ping["status"], ping["service"]) == ("Healthy", "My Agent")


@runner("agent-curl")
def test_agent_curl(tmp_path: Path) -> None:
    port = free_port()
    script = snippet("agent-curl").replace("8080", str(port))
    env = shell_env(PPIO_AGENT_BIND=f"127.0.0.1:{port}")
    out = run_bash(script, ROOT, tmp_path / "bash.log", env)
    (reply,) = json_documents(out)
    assert reply["result"]["response"] == "Processed: hello"
    assert reply["result"]["session_id"] == "s1"
    assert reply["metadata"]["session_id"] == "s1"


@runner("agent-streaming")
def test_agent_streaming(tmp_path: Path) -> None:
    with (
        running(serve_agent_snippet("agent-streaming", tmp_path)) as (server,),
        server.client() as c,
    ):
        reply = c.post("/invocations", json={"prompt": "go"})
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = [chunk for chunk in reply.text.split("\n\n") if chunk.strip()]
    data = [
        json.loads(line[6:])
        for e in events[:-1]
        for line in e.splitlines()
        if line.startswith("data: ")
    ]
    assert data == [f"Chunk {i}" for i in range(1, 11)]
    assert events[-1].startswith("event: done")
    assert json.loads(events[-1].split("data: ", 1)[1])["chunks"] == 10


@runner("agent-middleware")
def test_agent_middleware(tmp_path: Path) -> None:
    with running(serve_agent_snippet("agent-middleware", tmp_path)) as (server,):
        with server.client() as c:
            refused = c.post("/invocations", json={"prompt": "hi"})
            allowed = c.post("/invocations", json={"prompt": "hi", "metadata": {"user_id": "ada"}})
        log = server.output()
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["type"] == "ValidationError"
    assert refused.json()["error"]["message"] == "User ID required"
    assert allowed.status_code == 200, allowed.text
    assert allowed.json()["result"] == {"hello": "ada"}
    assert re.search(r"INFO my_agent: took \d+\.\d ms", log), log  # the timing middleware ran


@runner("config")
def test_config(tmp_path: Path) -> None:
    script = tmp_path / "config.py"
    script.write_text(snippet("config") + "print(app.config)\n")
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=shell_env(),
    )
    assert done.returncode == 0, done.stderr
    assert "host='0.0.0.0', port=8080, timeout=300" in done.stdout


# -- the orchestrator and the CLI ---------------------------------------------------------------


@runner("orchestrator-curl")
def test_orchestrator_curl(orchestrator: ServeCommand, tmp_path: Path) -> None:
    _, rest = split_server(snippet("orchestrator-curl"))
    out = run_bash(
        orchestrator.rewrite(rest), orchestrator.workdir, tmp_path / "curl.log", shell_env()
    )
    created, turn = json_documents(out)
    assert (created["session_id"], created["status"]) == ("chat-0", "ready")
    assert created["template_id"].startswith("assistant-")
    assert turn["status"] == "success"
    assert turn["result"]["turn"] == 1
    assert turn["result"]["answer"].startswith("(1) you said 'hello'")


@runner("cli")
def test_cli(orchestrator: ServeCommand, tmp_path: Path) -> None:
    script = orchestrator.rewrite(snippet("cli")).replace(
        "/tmp/my-agent", str(tmp_path / "my-agent")
    )
    out = run_bash(script, orchestrator.workdir, tmp_path / "cli.log", shell_env())
    listed = [line.split() for line in out.splitlines() if line.startswith("assistant-")]
    assert len(listed) == 1, out  # the copy and the shared template: the same id, listed once
    template_id = listed[0][0]
    assert template_id in (tmp_path / "my-agent" / ".ppio-agent.yaml").read_text()  # status block
    assert "(1) you said 'hello'" in out
    assert "(1) you said 'and again'" in out  # chat-1 is a new session
    assert "'stream" in out  # the streamed words
    assert re.search(r"^chat-1\s+assistant-\w+\s+ready\s+1\s", out, re.MULTILINE), out
    assert out.rstrip().endswith("\nclosed chat-1"), out


@runner("serve-workers")
def test_serve_workers(tmp_path: Path) -> None:
    (line,) = [ln for ln in snippet("serve-workers").splitlines() if ln.strip()]
    served = ServeCommand(line, workdir_with_examples(tmp_path / "work"))
    try:
        served.wait_ready()
        deadline = time.monotonic() + 30
        while True:  # a worker still starting answers 503 with Retry-After, as documented
            reply = httpx.post(
                f"{served.base_url}/v1/agents/assistant/invocations",
                json={"prompt": "hello"},
                headers={"X-PPIO-Session-Id": "w-1"},
                timeout=30,
            )
            if reply.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert reply.status_code == 200, reply.text
        assert reply.json()["result"]["turn"] == 1
    finally:
        code = served.stop()
    assert code == 0, served.log.read_text()


# -- the client ---------------------------------------------------------------------------------


def run_python(text: str, tmp_path: Path, name: str) -> str:
    script = tmp_path / f"{name}.py"
    script.write_text(text)
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=shell_env(),
        cwd=tmp_path,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


@runner("client")
def test_client(keyed_orchestrator: ServeCommand, tmp_path: Path) -> None:
    out = run_python(keyed_orchestrator.rewrite(snippet("client")), tmp_path, "client").splitlines()
    assert out[0].startswith("{'answer': \"(1) you said 'Hello, world!'"), out
    assert out[1].startswith("{'answer': \"(1) you said 'and again'"), out  # a new session
    words = out[2:]  # streamed word by word
    assert words[0] == "(2)", out
    assert "'stream" in words, out


@runner("client-pool")
def test_client_pool(keyed_orchestrator: ServeCommand, tmp_path: Path) -> None:
    out = run_python(keyed_orchestrator.rewrite(snippet("client-pool")), tmp_path, "pool")
    lines = out.splitlines()
    assert lines[0].startswith("(2) you said 'what did I say?'; before that: 'remember 42'"), out
    assert len(lines) > 3, out  # the story streamed as words, not one dict
    assert not any(line.startswith("{") for line in lines), out
    assert lines[-1].startswith("PoolStats(size="), out
