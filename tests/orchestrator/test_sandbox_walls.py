"""The walls around a process sandbox, proved from inside an agent.

Each test starts real sandboxes of ``agents/walls_agent.py`` and has the
agent try to get out: read the orchestrator's keys file, another session's
files, the orchestrator's environment and memory through ``/proc``, signal
the orchestrator, fork without end, allocate past its memory limit, reach a
listener on the host's loopback. The agent reports what happened; a wall
that held shows as the error the agent got. The orchestrator (here: this
test process, or one served in it) lives on, the sandbox serves the next
turn, and after close no process of the sandbox is left.

Walls depend on the host (bubblewrap, root, writable cgroups). Nothing is
skipped: where the host lacks a wall, the test asserts the WARNING that
names it and the fallback's behaviour instead (and one test pretends the
host has no wall at all, so the fallbacks are exercised everywhere).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from ppio_sandbox.agent_runtime.errors import (
    InvocationError,
    SandboxCrashedError,
    ServiceUnavailableError,
    ValidationError,
)
from ppio_sandbox.orchestrator._template_spec import parse_agent_yaml
from ppio_sandbox.orchestrator.sandbox import _isolation
from ppio_sandbox.orchestrator.sandbox import _process_sandbox as process_sandbox
from ppio_sandbox.orchestrator.sandbox.base import TurnCall
from ppio_sandbox.orchestrator.sandbox.process import ProcessSandbox, ProcessSandboxProvider

from .conftest import orchestrator

AGENTS = Path(__file__).parent / "agents"
MiB = 1024 * 1024
SECRET = "SECRET-KEY-" + "7" * 16


@pytest.fixture
def host() -> _isolation.HostSupport:
    return _isolation.host_support()


@pytest.fixture(autouse=True)
def fresh_warnings(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Missing walls are logged once per process; each test wants to see its own."""
    caplog.set_level(logging.WARNING, logger="ppio_sandbox.orchestrator.sandbox")
    _isolation._warned.clear()
    yield
    _isolation._warned.clear()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """An orchestrator's data directory, with a keys file the agent must not read."""
    data = tmp_path / "data"
    data.mkdir()
    keys = data / "keys.json"
    keys.write_text(f'{{"keys": [{{"tenant": "t", "key_id": "k", "secret": "{SECRET}"}}]}}')
    keys.chmod(0o600)
    return data


def call(op: str, **fields: Any) -> TurnCall:
    return TurnCall(
        {"op": op, **fields},
        session_id="walls",
        request_id=f"r-{time.monotonic_ns()}",
        state={},
    )


def warned(caplog: pytest.LogCaptureFixture, *words: str) -> bool:
    """Whether a WARNING about missing walls names all of ``words``."""
    return any(
        record.levelno == logging.WARNING and all(w in record.getMessage() for w in words)
        for record in caplog.records
        if "without some walls" in record.getMessage()
    )


def boot_ticks() -> int:
    """Now, in clock ticks since boot (the unit of a process's start time in /proc)."""
    return int(float(Path("/proc/uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK"))


def processes_of_uid(uid: int, started_before: int | None = None) -> list[int]:
    """Processes running as ``uid``; only those started before ``started_before``
    (:func:`boot_ticks`) if given: once a sandbox has released its uid, a test in
    another process may lease it for a sandbox of its own."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
                started = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[19])
            except (OSError, IndexError, ValueError):
                continue
            if f"\nUid:\t{uid}\t" in status and (
                started_before is None or started < started_before
            ):
                found.append(int(entry))
    return found


def assert_left_nothing(facts: dict[str, Any], closing: int) -> None:
    """Nothing of a sandbox closed at ``closing`` (:func:`boot_ticks`) remains: its
    process, uid, cgroup, files."""
    pid = facts["pid"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    if facts["uid"] is not None:
        assert processes_of_uid(facts["uid"], started_before=closing) == []
    for directory in facts["cgroups"]:
        assert not directory.exists(), f"cgroup {directory} was not removed"
    assert not Path(facts["workdir"]).exists()


def facts_of(sandbox: ProcessSandbox) -> dict[str, Any]:
    cgroup = sandbox.cgroup
    return {
        "pid": sandbox.pid,
        "uid": sandbox.uid,
        "cgroups": list(cgroup.dirs) if cgroup is not None else [],
        "workdir": sandbox.workdir,
    }


@asynccontextmanager
async def sandbox(data_dir: Path, **options: Any) -> AsyncIterator[ProcessSandbox]:
    """A started walls agent whose ``work_root`` is in ``data_dir``, as the orchestrator's is."""
    sb = ProcessSandbox(AGENTS, "walls_agent.py", work_root=data_dir / "sandboxes", **options)
    try:
        await sb.start()
        facts = facts_of(sb)
        yield sb
    finally:
        closing = boot_ticks()
        await sb.close()
    assert_left_nothing(facts, closing)


async def run(sb: ProcessSandbox, op: str, **fields: Any) -> Any:
    return await sb.invoke(call(op, **fields))


@pytest.mark.anyio
async def test_the_agent_sees_a_world_of_its_own(
    data_dir: Path, host: _isolation.HostSupport, caplog: pytest.LogCaptureFixture
) -> None:
    me = os.getpid()
    async with sandbox(data_dir) as sb:
        seen = await run(sb, "whoami")
        keys = await run(sb, "read", path=str(data_dir / "keys.json"))
        data_listing = await run(sb, "listdir", path=str(data_dir))
        environ = await run(sb, "read", path=f"/proc/{me}/environ")
        memory = await run(sb, "read", path=f"/proc/{me}/mem")
        signalled = await run(sb, "kill", pid=me, signal=0)  # 0: the same checks, no signal
        assert (await run(sb, "echo"))["session_id"] == "walls"  # still serving
        if host.bwrap is None:
            # Fallback: the orchestrator's user and file system; the log says so.
            assert warned(caplog, "namespaces")
            assert seen["uid"] == os.geteuid()
            assert keys["ok"]
            assert SECRET in keys["value"]
            assert signalled["ok"]
            return
        # Its own PID namespace: it is pid 2 (bwrap's init is 1) and sees no other process.
        assert seen["pid"] == 2
        assert seen["processes"] == [1, 2]
        assert seen["hostname"] == "sandbox"
        # Its own mount namespace: the data dir holds only the sandboxes' folder,
        # and of that only the runtime's import root and its own workdir.
        assert keys == {"ok": False, "error": "FileNotFoundError", "errno": 2}
        assert data_listing["value"] == ["sandboxes"]
        sandboxes = await run(sb, "listdir", path=str(data_dir / "sandboxes"))
        assert sandboxes["value"] == sorted([".ppio-python", Path(seen["cwd"]).name])
        assert "sys" not in seen["root"]
        assert "home" not in seen["root"]
        # The orchestrator's /proc entries do not exist in its PID namespace.
        assert environ["ok"] is False
        assert environ["error"] == "FileNotFoundError"
        assert memory["ok"] is False
        assert memory["error"] == "FileNotFoundError"
        assert signalled == {"ok": False, "error": "ProcessLookupError", "errno": 3}
        # No capabilities, and none to gain by exec.
        assert seen["cap_eff"] == seen["cap_bnd"] == "0" * 16
        assert seen["no_new_privs"] == "1"
        if host.setpriv is None:
            assert warned(caplog, "own uid")
            return
        first, count = _isolation.DEFAULT_UID_RANGE
        assert first <= seen["uid"] < first + count
        assert seen["uid"] == seen["gid"] == sb.uid
        assert seen["groups"] in ([], [seen["gid"]])
        assert Path(seen["cwd"]).stat().st_uid == seen["uid"]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_another_sessions_files_are_out_of_reach_even_through_a_leaked_bind(
    data_dir: Path, host: _isolation.HostSupport, caplog: pytest.LogCaptureFixture
) -> None:
    async with sandbox(data_dir) as b:
        assert b.workdir is not None
        secret = b.workdir / "secret.txt"
        assert (await run(b, "write", path=str(secret), text="B's secret"))["ok"]
        assert (await run(b, "read", path=str(secret)))["value"] == "B's secret"
        # A: another session. C: as if a bind mount leaked B's directory into it.
        async with (
            sandbox(data_dir) as a,
            sandbox(data_dir, read_only_paths=[b.workdir]) as c,
        ):
            from_a = await run(a, "read", path=str(secret))
            from_c = await run(c, "read", path=str(secret))
            listing_c = await run(c, "listdir", path=str(b.workdir))
            if host.bwrap is None:
                assert warned(caplog, "namespaces")
                assert from_a["ok"]
                assert from_c["ok"]
                return
            assert from_a == {"ok": False, "error": "FileNotFoundError", "errno": 2}
            if host.setpriv is None:
                assert warned(caplog, "own uid")
                assert from_c["ok"]
                return
            # C sees the directory (the bind), but it belongs to B's uid, mode 0700.
            assert a.uid != b.uid != c.uid
            assert listing_c == {"ok": False, "error": "PermissionError", "errno": 13}
            assert from_c == {"ok": False, "error": "PermissionError", "errno": 13}
            assert (await run(c, "echo"))["echo"]["op"] == "echo"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_two_sandboxes_never_share_a_uid(
    data_dir: Path, host: _isolation.HostSupport
) -> None:
    one = (_isolation.DEFAULT_UID_RANGE[0] + 60_000, 1)  # a range of one uid
    async with sandbox(data_dir, uid_range=one) as first:
        if host.setpriv is None:
            assert first.uid is None
            return
        assert first.uid == one[0]
        second = ProcessSandbox(
            AGENTS, "walls_agent.py", work_root=data_dir / "sandboxes", uid_range=one
        )
        with pytest.raises(SandboxCrashedError, match="no free sandbox uid"):
            await second.start()
        assert second.workdir is None or not second.workdir.exists()
    async with sandbox(data_dir, uid_range=one) as third:  # released at close
        assert third.uid == one[0]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_the_network_is_off_unless_the_template_turns_it_on(
    data_dir: Path, host: _isolation.HostSupport, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        async with sandbox(data_dir) as off, sandbox(data_dir, network=True) as on:
            from_off = await run(off, "connect", host="127.0.0.1", port=port)
            from_on = await run(on, "connect", host="127.0.0.1", port=port)
    assert from_on == {"ok": True, "value": None}  # the listener is there to be reached
    if host.bwrap is None:
        assert warned(caplog, "namespaces")
        assert from_off["ok"]
        return
    # Its own network namespace: a loopback with nothing listening.
    assert from_off == {"ok": False, "error": "ConnectionRefusedError", "errno": 111}


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_a_fork_bomb_stops_at_pids_limit(
    data_dir: Path, host: _isolation.HostSupport, caplog: pytest.LogCaptureFixture
) -> None:
    async with sandbox(data_dir, pids_limit=32) as sb:
        bomb = await run(sb, "spawn_many", count=150)
        assert (await run(sb, "echo"))["echo"]["op"] == "echo"  # the sandbox lives on
        cgroup = sb.cgroup
        if cgroup is not None and cgroup.plan.pids is not None:
            limit = (cgroup.plan.pids.base / cgroup.name / "pids.max").read_text().strip()
            assert limit == "32"
    if host.pids is None:
        assert warned(caplog, "pids cgroup")
    if host.pids is None and host.setpriv is None:
        assert bomb == {"started": 150, "error": None}  # no wall: the bounded bomb went off
        return
    # pids.max (or RLIMIT_NPROC for its uid) counts its threads too: fewer than 32 children.
    assert bomb["error"] == "BlockingIOError"
    assert 0 < bomb["started"] < 32


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_memory_past_the_limit_ends_the_sandbox_not_the_orchestrator(
    data_dir: Path, host: _isolation.HostSupport, caplog: pytest.LogCaptureFixture
) -> None:
    async with sandbox(data_dir, memory_limit=256 * MiB) as sb:
        assert await run(sb, "alloc", bytes=32 * MiB) == 32 * MiB
        if host.memory is None:
            assert warned(caplog, "memory cgroup", "RLIMIT_AS")
            with pytest.raises(InvocationError, match="MemoryError"):
                await run(sb, "alloc", bytes=2048 * MiB)
            assert sb.alive
            return
        begun = time.monotonic()
        with pytest.raises(SandboxCrashedError, match="out of memory") as info:
            await run(sb, "alloc", bytes=2048 * MiB)
        assert time.monotonic() - begun < 10
        assert "SIGKILL" in str(info.value)
        assert not sb.alive


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_crash_errors_name_no_host_path_but_the_log_keeps_them(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with sandbox(data_dir) as sb:
        workdir = sb.workdir
        text = f"dying in {workdir}/agent.py, near {data_dir}/keys.json"
        with pytest.raises(SandboxCrashedError, match="exited with code 3") as info:
            await run(sb, "say_and_die", text=text, code=3)
    message = str(info.value)
    assert "dying in <workdir>/agent.py, near <data>/keys.json" in message
    assert str(data_dir) not in message
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert text in logged  # the orchestrator's own log has the whole tail


@pytest.mark.anyio
async def test_a_paused_sandbox_answers_ping_at_once_and_a_stuck_one_in_bounded_time(
    data_dir: Path, host: _isolation.HostSupport, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with sandbox(data_dir) as sb:
        assert sb.pid is not None
        await sb.pause()
        with anyio.fail_after(1):
            answer = await sb.ping()
        assert answer["status"] == "Paused"
        cgroup = sb.cgroup
        if cgroup is not None and cgroup.plan.freezer is not None:
            directory = anyio.Path(cgroup.plan.freezer.base / cgroup.name)
            if cgroup.plan.freezer.version == 2:
                events = directory / "cgroup.events"
                with anyio.fail_after(5):  # freezing completes asynchronously
                    while "frozen 1" not in await events.read_text():
                        await anyio.sleep(0.01)
            else:
                state = directory / "freezer.state"
                with anyio.fail_after(5):
                    while (await state.read_text()).strip() != "FROZEN":
                        await anyio.sleep(0.01)
        await sb.resume()
        assert (await sb.ping())["status"] == "Healthy"
        # Stopped behind the sandbox's back, the agent cannot answer: ping gives up in time.
        monkeypatch.setattr(process_sandbox, "_PING_TIMEOUT", httpx.Timeout(0.3))
        group = await sb._agent_group()
        assert group is not None
        os.killpg(group, signal.SIGSTOP)
        try:
            begun = time.monotonic()
            with pytest.raises(ServiceUnavailableError, match="did not answer /ping"):
                await sb.ping()
            assert time.monotonic() - begun < 3
            assert sb.alive  # slow is not dead
        finally:
            os.killpg(group, signal.SIGCONT)
        assert (await sb.ping())["status"] == "Healthy"


@pytest.mark.parametrize("tools", ["util-linux", "none"])
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_without_walls_the_fallbacks_run_and_are_named_in_the_log(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tools: str
) -> None:
    bare = _isolation.HostSupport(
        root=os.geteuid() == 0,
        problems={
            "namespaces": "bubblewrap is not installed (apt-get install bubblewrap)",
            "uid": "it needs the namespaces",
            **dict.fromkeys(("memory", "cpu", "pids", "freezer"), "no cgroup hierarchy offers it"),
        },
    )
    monkeypatch.setattr(_isolation, "_detected", bare)
    if tools == "none":  # no setpriv/prlimit/taskset: the set-up runs as preexec_fn
        monkeypatch.setattr(
            _isolation, "host_tools", lambda: _isolation.Tools(None, None, None, None)
        )
    provider = ProcessSandboxProvider(
        AGENTS, "walls_agent.py", work_root=data_dir / "sandboxes", isolation="bwrap"
    )
    with pytest.raises(SandboxCrashedError, match="isolation='bwrap': bubblewrap is not"):
        await provider.open()
    async with sandbox(data_dir, memory_limit=512 * MiB, cpu_limit=0.5) as sb:
        seen = await run(sb, "whoami")
        keys = await run(sb, "read", path=str(data_dir / "keys.json"))
        assert sb.describe()["isolation"]["level"] == "none"
        limits = Path(f"/proc/{sb.pid}/limits").read_text()
        assert str(512 * MiB) in next(x for x in limits.splitlines() if "address space" in x)
        if len(os.sched_getaffinity(0)) >= 2:
            assert len(os.sched_getaffinity(seen["pid"])) == 1
        await sb.pause()  # SIGSTOP: the process shows as stopped
        with anyio.fail_after(5):
            while Path(f"/proc/{sb.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
                await anyio.sleep(0.01)
        await sb.resume()
    assert warned(caplog, "namespaces: bubblewrap is not installed")
    assert warned(caplog, "memory cgroup", "RLIMIT_AS", "cpu cgroup", "CPU affinity")
    assert warned(caplog, "pids cgroup", "freezer cgroup", "SIGSTOP")
    assert seen["uid"] == os.geteuid()
    assert seen["pid"] == facts_of(sb)["pid"]  # no wrapper process
    assert keys["ok"]
    assert SECRET in keys["value"]


_ORPHAN_PROBE = """
import anyio, json, sys
from pathlib import Path
from ppio_sandbox.orchestrator.sandbox.process import ProcessSandbox

async def main():
    sb = ProcessSandbox(Path(sys.argv[1]), "walls_agent.py", work_root=Path(sys.argv[2]))
    await sb.start()
    cgroup = sb.cgroup
    dirs = [str(d) for d in cgroup.dirs] if cgroup else []
    print(json.dumps({"pid": sb.pid, "uid": sb.uid, "cgroups": dirs}), flush=True)
    await anyio.sleep(60)

anyio.run(main)
"""


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_a_sigkilled_orchestrator_takes_its_sandboxes_with_it(data_dir: Path) -> None:
    argv = [sys.executable, "-c", _ORPHAN_PROBE, str(AGENTS), str(data_dir / "sandboxes")]
    probe = await anyio.to_thread.run_sync(lambda: subprocess.Popen(argv, stdout=subprocess.PIPE))
    try:
        assert probe.stdout is not None
        with anyio.fail_after(20):
            line = await anyio.to_thread.run_sync(probe.stdout.readline)
        facts = json.loads(line)
        os.kill(facts["pid"], 0)  # the sandbox runs
    finally:
        killed = boot_ticks()
        probe.kill()
        probe.wait()

    def alive(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state not in ("Z", "X")

    with anyio.fail_after(5):
        while alive(facts["pid"]) or (
            facts["uid"] and processes_of_uid(facts["uid"], started_before=killed)
        ):
            await anyio.sleep(0.01)
    for directory in facts["cgroups"]:  # the dead orchestrator could not remove them
        with anyio.fail_after(5):
            while Path(directory).exists():
                try:
                    Path(directory).rmdir()
                except OSError:
                    await anyio.sleep(0.01)


# -- through the orchestrator ----------------------------------------------------------------

_TEMPLATE_YAML = """\
apiVersion: v1
kind: Agent
metadata:
  name: {name}
spec:
  entrypoint: agent.py
  runtime:
    timeout: 20
    memory_limit: 256Mi
  sandbox:
    kind: process
    warm_pool: 1
    network: {network}
"""


def test_network_is_a_process_template_setting() -> None:
    spec = parse_agent_yaml(_TEMPLATE_YAML.format(name="walls", network="true"))
    assert spec.sandbox.network is True
    assert (
        parse_agent_yaml(
            _TEMPLATE_YAML.replace("    network: {network}\n", "").format(name="walls")
        ).sandbox.network
        is False
    )
    with pytest.raises(ValidationError, match=r"spec\.sandbox\.network: must be true or false"):
        parse_agent_yaml(_TEMPLATE_YAML.format(name="walls", network='"yes"'))
    inprocess = _TEMPLATE_YAML.replace("kind: process", "kind: inprocess").replace(
        "    warm_pool: 1\n", ""
    )
    with pytest.raises(ValidationError, match=r"spec\.sandbox\.network: only process sandboxes"):
        parse_agent_yaml(inprocess.format(name="walls", network="true"))


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_through_the_orchestrator_attempts_fail_and_the_next_turn_is_served(
    tmp_path: Path, host: _isolation.HostSupport
) -> None:
    templates = []
    for name, network in (("walls", "false"), ("walls-net", "true")):
        template = tmp_path / name
        template.mkdir()
        shutil.copy(AGENTS / "walls_agent.py", template / "agent.py")
        yaml = _TEMPLATE_YAML.format(name=name, network=network)
        (template / ".ppio-agent.yaml").write_text(yaml)
        templates.append(str(template))
    data_dir = tmp_path / "data"
    me = os.getpid()
    uids: set[int] = set()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    async with orchestrator(tmp_path, templates=tuple(templates)) as o:
        (data_dir / "keys.json").write_text(SECRET)
        # network: true in the template reaches the host's loopback; the default does not.
        net_sid = await o.session("walls-net")
        port = listener.getsockname()[1]
        reached = await o.invoke(net_sid, {"op": "connect", "host": "127.0.0.1", "port": port})
        assert reached.json()["result"] == {"ok": True, "value": None}
        sid = await o.session("walls")
        refused = await o.invoke(sid, {"op": "connect", "host": "127.0.0.1", "port": port})
        assert refused.json()["result"]["ok"] is (host.bwrap is None)

        async def turn(op: str, **fields: Any) -> httpx.Response:
            return await o.invoke(sid, {"op": op, **fields})

        seen = (await turn("whoami")).json()["result"]
        uids.add(seen["uid"])
        keys = (await turn("read", path=str(data_dir / "keys.json"))).json()["result"]
        environ = (await turn("read", path=f"/proc/{me}/environ")).json()["result"]
        if host.bwrap is not None:
            assert keys["ok"] is False
            assert environ["ok"] is False
        if host.setpriv is not None:
            assert seen["uid"] != 0
        crashed = await turn("alloc", bytes=2048 * MiB)
        if host.memory is not None:
            assert crashed.status_code == 502, crashed.text
            error = crashed.json()["error"]
            assert error["type"] == "SandboxCrashedError"
            assert "out of memory" in error["message"]
            assert str(data_dir) not in crashed.text
        else:
            assert crashed.status_code == 500, crashed.text
        # The orchestrator lives on and the session's next turn is served.
        again = await turn("whoami")
        assert again.status_code == 200, again.text
        uids.add(again.json()["result"]["uid"])
        # A paused session's ping is answered at once, without the process.
        await o.client.post(f"/v1/sessions/{sid}/pause")
        with anyio.fail_after(2):
            ping = await o.client.get(f"/v1/sessions/{sid}/ping")
        assert ping.json()["status"] == "Paused"
        await o.client.post(f"/v1/sessions/{sid}/resume")
        assert (await turn("echo")).status_code == 200
        closing = boot_ticks()
    listener.close()
    # Nothing of any sandbox survives the orchestrator.
    for uid in uids - {os.geteuid()}:
        assert processes_of_uid(uid, started_before=closing) == []
    assert sorted(p.name for p in (data_dir / "sandboxes").iterdir()) == [".ppio-python"]


def test_walls_in_the_describe_view_match_the_host(host: _isolation.HostSupport) -> None:
    plan = _isolation.make_plan(
        "auto", network=False, bind="unix", memory_limit=1, cpu_limit=1.0, pids_limit=1
    )
    view = plan.describe()
    assert view["namespaces"] is (host.bwrap is not None)
    assert view["own_uid"] is (host.setpriv is not None)
    assert view["network"] is (host.bwrap is None)
    walls = {"memory": host.memory, "cpu": host.cpu, "pids": host.pids, "freezer": host.freezer}
    assert view["cgroups"] == {k: f"v{h.version}" for k, h in walls.items() if h is not None}
    tcp = dataclasses.asdict(
        _isolation.make_plan(
            "auto", network=False, bind="tcp", memory_limit=None, cpu_limit=None, pids_limit=None
        )
    )
    assert tcp["network"] is True  # bind="tcp" needs the host's loopback
    assert tcp["memory"] is None
    assert tcp["cpu"] is None
    assert tcp["pids"] is None
