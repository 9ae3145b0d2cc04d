"""``ppio-sandbox-cli serve`` as a real subprocess: SIGTERM drain, orphans, binding.

This module also holds the helpers the other ``test_orchestrator_*`` modules
import: :class:`ServeProcess` (the orchestrator in a subprocess, its output in
a file, ready once ``/ping`` answers) and a small ``/proc`` reader used to
prove that no process outlives the orchestrator.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest

from tests.e2e.helpers import free_port

TEMPLATES = Path(__file__).resolve().parent / "orchestrator_templates"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
_SCRUBBED_ENV = ("PPIO_ORCHESTRATOR_KEYS", "PPIO_API_KEY", "PPIO_API_SECRET", "PPIO_BASE_URL")


# -- /proc --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str
    start: int  # clock ticks after boot: with the pid, names one process for good
    cmdline: tuple[str, ...]
    cwd: str | None


def read_proc(pid: int) -> Proc | None:
    """One process from ``/proc``, or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    try:
        cwd: str | None = os.readlink(f"/proc/{pid}/cwd")
    except OSError:  # gone, a zombie, or not ours to read
        cwd = None
    args = tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a)
    return Proc(pid, int(fields[1]), fields[0], int(fields[19]), args, cwd)


def process_table() -> dict[int, Proc]:
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (proc := read_proc(int(entry.name))) is not None:
            table[proc.pid] = proc
    return table


def descendants(root: int) -> dict[int, Proc]:
    """Every live process below ``root`` (children, grandchildren, ...)."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for proc in table.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    found: dict[int, Proc] = {}
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        if pid in table and pid not in found:
            found[pid] = table[pid]
            todo.extend(children.get(pid, ()))
    return found


def agents_below(root: int) -> list[Proc]:
    """The agent runtimes below ``root``: one per process sandbox, however walled.

    Behind bubblewrap a sandbox is bwrap, its namespace's init, then the
    agent (pid 2 in its own namespace); without walls it is the agent itself.
    """
    found = descendants(root) | ({root: p} if (p := read_proc(root)) is not None else {})
    return [
        p
        for p in found.values()
        if "ppio_sandbox.agent_runtime" in p.cmdline and "python" in Path(p.cmdline[0]).name
    ]


def is_alive(proc: Proc) -> bool:
    """Whether this very process (same pid *and* start time) still runs; zombies are dead."""
    now = read_proc(proc.pid)
    return now is not None and now.start == proc.start and now.state not in ("Z", "X")


def mentions(proc: Proc, *needles: str) -> bool:
    """Whether a process's command line or working directory names any of ``needles``."""
    texts = [*proc.cmdline, proc.cwd or ""]
    return any(needle in text for needle in needles for text in texts)


def kill_leftovers(procs: dict[int, Proc]) -> None:
    """Teardown safety net: SIGKILL what is still alive of ``procs`` and their groups."""
    for proc in procs.values():
        if is_alive(proc):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(proc.pid, signal.SIGKILL)


# -- the orchestrator in a subprocess -----------------------------------------------------------


class ServeProcess:
    """``python -m ppio_sandbox.orchestrator.cli serve ...`` in a subprocess.

    ``tcp=None`` serves on a Unix socket in ``workdir``; ``tcp="127.0.0.1"``
    (or another host) picks a free port, and starts again on another one if
    that port was taken meanwhile. Output goes to a file (never an unread
    pipe). :meth:`stop` always reaps the server and SIGKILLs any process it
    left behind, so a failing test cannot leak processes.
    """

    def __init__(
        self,
        workdir: Path,
        *args: str,
        data_dir: Path,
        tcp: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.args = list(args)
        self.data_dir = data_dir
        self.tcp = tcp
        self.sock = workdir / "orchestrator.sock"
        base = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        self.env = {**base, **(env or {})}
        self.log_path = workdir / f"serve-{secrets.token_hex(3)}.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen: dict[int, Proc] = {}

    def __enter__(self) -> ServeProcess:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}" if self.tcp else "http://orchestrator"

    @property
    def host_header(self) -> str:
        """The Host header httpx sends to this server (what HMAC signs)."""
        return self.base_url.removeprefix("http://")

    def command(self) -> list[str]:
        bind = ["--host", self.tcp, "--port", str(self.port)] if self.tcp else []
        bind = bind or ["--bind", f"unix:{self.sock}"]
        cli = [sys.executable, "-m", "ppio_sandbox.orchestrator.cli", "serve"]
        return [*cli, *bind, "--data-dir", str(self.data_dir), *self.args]

    def _launch(self) -> None:
        if self.tcp:
            self.port = free_port()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.workdir,
            )

    def start(self, timeout: float = READY_TIMEOUT) -> ServeProcess:
        """Launch and wait (bounded) until ``/ping`` answers 200."""
        self._launch()
        retries = 2
        deadline = time.monotonic() + timeout
        with self.client(timeout=2.0) as client:
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    log = self.log()
                    if self.tcp and retries and "address already in use" in log.lower():
                        retries -= 1
                        self._launch()
                        continue
                    raise RuntimeError(f"serve exited with {self.proc.returncode}:\n{log}")
                try:
                    if client.get("/ping").status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"serve not ready after {timeout} s:\n{self.log()}")
                time.sleep(0.02)

    def transport(self) -> httpx.HTTPTransport | None:
        return None if self.tcp else httpx.HTTPTransport(uds=str(self.sock))

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 20.0)
        return httpx.Client(base_url=self.base_url, transport=self.transport(), **kwargs)

    def async_client(self, **kwargs: Any) -> httpx.AsyncClient:
        kwargs.setdefault("timeout", 20.0)
        transport = None if self.tcp else httpx.AsyncHTTPTransport(uds=str(self.sock))
        return httpx.AsyncClient(base_url=self.base_url, transport=transport, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def remember_children(self) -> dict[int, Proc]:
        """Note the server's current descendants (for the teardown safety net)."""
        if self.proc is not None and self.proc.poll() is None:
            self.seen.update(descendants(self.proc.pid))
        return self.seen

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait (bounded), SIGKILL if needed; reap; kill whatever it left behind."""
        if self.proc is None:
            return None
        self.remember_children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        kill_leftovers(self.seen)
        return self.proc.returncode


@contextlib.contextmanager
def serving(workdir: Path, *args: str, **kwargs: Any) -> Iterator[ServeProcess]:
    with ServeProcess(workdir, *args, **kwargs) as server:
        yield server


def template_args(*names: str) -> list[str]:
    return [arg for name in names for arg in ("--template", str(TEMPLATES / name))]


# -- SIGTERM: drain, then no process left ---------------------------------------------------------


def _wait_for(check: Any, timeout: float, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met in {timeout} s")
        time.sleep(interval)


DRAINING = "SIGTERM: no new turns; draining 2 running"
BOTH = ("worker-process", "worker-inprocess")


async def _sessions(client: httpx.AsyncClient) -> tuple[str, str, int]:
    """A process session and an in-process one: (process sid, in-process sid, sandbox pid)."""
    made = []
    for template in BOTH:
        r = await client.post("/v1/sessions", json={"template_id": template})
        assert r.status_code == 201, r.text
        made.append(r.json())
    assert made[0]["sandbox"]["kind"] == "process"
    assert made[1]["sandbox"] == {"kind": "inprocess"}
    return made[0]["session_id"], made[1]["session_id"], made[0]["sandbox"]["pid"]


@contextlib.asynccontextmanager
async def _signalled_mid_turn(
    server: ServeProcess, client: httpx.AsyncClient, sids: tuple[str, ...], seconds: float
) -> AsyncIterator[tuple[dict[str, httpx.Response], float]]:
    """Start a turn sleeping ``seconds`` on each session; SIGTERM the server once all run.

    Yields once the server has logged that it drains: the turns' replies
    (filled in as they end; all there after the block) and when the signal
    was sent.
    """
    replies: dict[str, httpx.Response] = {}

    async def slow_turn(sid: str) -> None:
        replies[sid] = await client.post(
            f"/v1/sessions/{sid}/invocations",
            json={"action": "sleep", "seconds": seconds, "prompt": sid},
        )

    async with anyio.create_task_group() as tg:
        for sid in sids:
            tg.start_soon(slow_turn, sid)
        with anyio.fail_after(10):
            for sid in sids:
                while (await client.get(f"/v1/sessions/{sid}")).json()["status"] != "busy":
                    await anyio.sleep(0.01)
        sigterm_at = time.monotonic()
        os.kill(server.pid, signal.SIGTERM)
        await anyio.to_thread.run_sync(_wait_for, lambda: DRAINING in server.log(), 10.0)
        yield replies, sigterm_at


def _assert_nothing_left(before: dict[int, Proc], data_dir: Path, *needles: str) -> None:
    """No process of ``before`` lives on, and none anywhere names the data dir or ``needles``."""

    def leftovers() -> list[Proc]:
        survivors = [p for p in before.values() if is_alive(p)]
        strays = [
            p
            for p in process_table().values()
            if p.state not in ("Z", "X") and mentions(p, str(data_dir), *needles)
        ]
        return survivors + strays

    with contextlib.suppress(TimeoutError):  # signals land asynchronously: a short grace
        _wait_for(lambda: not leftovers(), 3.0)
    assert leftovers() == []
    sandboxes = data_dir / "sandboxes"
    assert sorted(p.name for p in sandboxes.iterdir()) == [".ppio-python"]


@pytest.mark.anyio
async def test_sigterm_drains_the_running_turns_then_exits_0_leaving_no_process(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    marker = "ppio-e2e-orphan-" + secrets.token_hex(8)
    args = [*template_args("worker_process", "worker_inprocess"), "--grace", "10"]
    with serving(tmp_path, *args, data_dir=data_dir) as server:
        async with server.async_client() as client:
            proc_sid, inproc_sid, sandbox_pid = await _sessions(client)

            # The agent starts a grandchild of the orchestrator in its process group.
            r = await client.post(
                f"/v1/sessions/{proc_sid}/invocations", json={"action": "spawn", "marker": marker}
            )
            assert r.status_code == 200, r.text
            agent_pid = r.json()["result"]["pid"]  # as the agent sees it (its own namespace)

            # The session took the warm process; its replacement is launched at once.
            def warm() -> list[Proc]:
                return [p for p in agents_below(server.pid) if p.pid != sandbox_pid]

            def everything_started() -> bool:
                # the session's agent and the warm one, and the agent's child
                marked = [p for p in descendants(sandbox_pid).values() if marker in p.cmdline]
                return len(agents_below(server.pid)) == 2 and len(marked) == 1

            await anyio.to_thread.run_sync(_wait_for, everything_started, 15.0)
            assert len(agents_below(sandbox_pid)) == 1
            before = server.remember_children()
            assert sandbox_pid in before
            assert [p for p in before.values() if marker in p.cmdline]

            sids = (proc_sid, inproc_sid)
            async with _signalled_mid_turn(server, client, sids, 1.5) as (replies, sigterm_at):
                # Admission is closed while the turns drain: no new session, on any connection.
                async with server.async_client() as late:
                    try:
                        refused = await late.post("/v1/sessions", json={"template_id": BOTH[1]})
                    except httpx.TransportError:
                        pass  # the listener is closed: refused outright
                    else:
                        assert refused.status_code == 503, refused.text
                        assert refused.json()["error"]["type"] == "ServiceUnavailableError"
                assert replies == {}  # the turns are still running
            exit_code = await anyio.to_thread.run_sync(server.wait, 15.0)
            stopped_at = time.monotonic()

    for sid in sids:
        reply = replies[sid]
        assert reply.status_code == 200, reply.text
        result = reply.json()["result"]
        assert result["echo"] == sid
        assert result["ended"] >= sigterm_at  # still running when the signal came
    assert replies[proc_sid].json()["result"]["pid"] == agent_pid  # the same agent process
    assert exit_code == 0, server.log()
    assert stopped_at - sigterm_at < 10.0
    assert "orchestrator stopped" in server.log()
    # Nothing the orchestrator started may outlive it: not the session's
    # sandbox, not the warm one, not the grandchild the agent started.
    _assert_nothing_left(before, data_dir, marker)


@pytest.mark.anyio
async def test_turns_still_running_when_the_grace_ends_are_cut_and_nothing_is_left(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    args = [*template_args("worker_process", "worker_inprocess"), "--grace", "1"]
    with serving(tmp_path, *args, data_dir=data_dir) as server:
        async with server.async_client() as client:
            sids = (await _sessions(client))[:2]

            def two_agents() -> bool:  # the session's sandbox and the warm one
                return len(agents_below(server.pid)) == 2

            await anyio.to_thread.run_sync(_wait_for, two_agents, 15.0)
            before = server.remember_children()
            async with _signalled_mid_turn(server, client, sids, 30) as (replies, sigterm_at):
                exit_code = await anyio.to_thread.run_sync(server.wait, 15.0)
                stopped_at = time.monotonic()
    assert exit_code == 0, server.log()
    assert stopped_at - sigterm_at < 10.0  # about the grace, not the 30 s turns
    for sid in sids:
        assert replies[sid].status_code >= 500
    _assert_nothing_left(before, data_dir)


@pytest.mark.anyio
async def test_a_turn_cut_off_by_the_grace_gets_an_error_envelope(tmp_path: Path) -> None:
    args = [*template_args("worker_process", "worker_inprocess"), "--grace", "1"]
    with serving(tmp_path, *args, data_dir=tmp_path / "data") as server:
        async with server.async_client() as client:
            sids = (await _sessions(client))[:2]
            async with _signalled_mid_turn(server, client, sids, 30) as (replies, sigterm_at):
                await anyio.to_thread.run_sync(server.wait, 15.0)
                stopped_at = time.monotonic()
    for sid in sids:
        reply = replies[sid]
        assert reply.headers.get("content-type") == "application/json", (reply, reply.text)
        assert reply.status_code != 500, reply.text  # 500 means "the agent raised"
        assert set(reply.json()) == {"error"}, reply.text
    assert stopped_at - sigterm_at < 1.0 + 1.0  # one grace, plus closing the sandboxes


@pytest.mark.anyio
async def test_a_second_sigterm_stops_at_once_and_still_leaves_no_process(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    args = [*template_args("worker_process", "worker_inprocess"), "--grace", "30"]
    with serving(tmp_path, *args, data_dir=data_dir) as server:
        async with server.async_client() as client:
            sids = (await _sessions(client))[:2]
            before = server.remember_children()
            async with _signalled_mid_turn(server, client, sids, 10):
                second_at = time.monotonic()
                os.kill(server.pid, signal.SIGTERM)
                try:
                    exit_code: int | None = await anyio.to_thread.run_sync(server.wait, 5.0)
                except subprocess.TimeoutExpired:
                    exit_code = None
                    await anyio.to_thread.run_sync(server.stop)  # end the turns' requests now
                stopped_at = time.monotonic()
    assert exit_code is not None, "still running 5 s after the second SIGTERM"
    assert exit_code == 0, server.log()
    assert stopped_at - second_at < 5.0
    _assert_nothing_left(before, data_dir)


# -- binding: loopback only without API keys ----------------------------------------------------


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net shows them) listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                address, _, hex_port = fields[1].partition(":")
                if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.add(address)
    return found


LOOPBACK_V4 = "0100007F"  # 127.0.0.1, little-endian hex
ANY_V4 = "00000000"


def test_serve_without_api_keys_on_0_0_0_0_binds_loopback_only_and_says_so(
    tmp_path: Path,
) -> None:
    with serving(tmp_path, data_dir=tmp_path / "data", tcp="0.0.0.0") as server:
        assert _listening(server.port) == {LOOPBACK_V4}
        with server.client() as client:
            assert client.get("/ping").json()["status"] == "Healthy"
        log = server.log()
    assert (
        "no API keys configured: binding 127.0.0.1 instead of 0.0.0.0; "
        "pass --api-key or set PPIO_ORCHESTRATOR_KEYS to serve other hosts"
    ) in log
    assert f"orchestrator listening on 127.0.0.1:{server.port}" in log


def test_serve_with_an_api_key_on_0_0_0_0_binds_every_interface(tmp_path: Path) -> None:
    """The counterpart: the loopback rule applies only when authentication is off."""
    args = ("--api-key", "acme:k1:a-secret-for-binding")
    with serving(tmp_path, *args, data_dir=tmp_path / "data", tcp="0.0.0.0") as server:
        assert _listening(server.port) == {ANY_V4}
        with server.client() as client:
            assert client.get("/ping").status_code == 200
            assert client.get("/v1/sessions").status_code == 401
        log = server.log()
    assert "binding 127.0.0.1 instead" not in log
    assert f"orchestrator listening on 0.0.0.0:{server.port}" in log


def test_the_served_process_freezes_start_up_objects_and_raises_gc_thresholds() -> None:
    """``tune_gc`` (what ``serve`` runs once templates are loaded), in a fresh process."""
    code = (
        "import gc\n"
        "from ppio_sandbox.orchestrator.server import GC_THRESHOLDS, tune_gc\n"
        "before = gc.get_freeze_count()\n"
        "tune_gc()\n"
        "assert gc.get_threshold() == GC_THRESHOLDS, gc.get_threshold()\n"
        "assert gc.get_freeze_count() > before + 1000, gc.get_freeze_count()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
