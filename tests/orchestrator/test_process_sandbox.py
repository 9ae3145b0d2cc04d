"""ProcessSandbox and ProcessSandboxProvider against real agent processes."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from ppio_sandbox.agent_runtime.errors import InvocationError, SandboxCrashedError
from ppio_sandbox.agent_runtime.server import pick_server
from ppio_sandbox.orchestrator.sandbox._process_spawn import resolve_server
from ppio_sandbox.orchestrator.sandbox.base import TurnCall
from ppio_sandbox.orchestrator.sandbox.process import ProcessSandbox, ProcessSandboxProvider

AGENTS = Path(__file__).parent / "agents"
MiB = 1024 * 1024
# The runtime's server in the sandbox (``auto`` picks uvicorn when installed, as
# here): the tests where the server's part shows run on both.
SERVERS = pytest.mark.parametrize("server", ["hypercorn", "uvicorn"])


@pytest.fixture
def work_root(tmp_path: Path) -> Path:
    return tmp_path / "work"


def call(payload: dict[str, Any], session_id: str = "s1", **headers: str) -> TurnCall:
    return TurnCall(
        payload,
        session_id=session_id,
        request_id=f"r-{time.monotonic_ns()}",
        state={},
        headers=headers,
    )


@asynccontextmanager
async def started(work_root: Path, **options: Any) -> AsyncIterator[ProcessSandbox]:
    options.setdefault("entrypoint", "ops_agent.py")
    sandbox = ProcessSandbox(AGENTS, work_root=work_root, **options)
    try:
        await sandbox.start()
        yield sandbox
    finally:
        await sandbox.close()


def assert_gone(pid: int) -> None:
    """The process no longer exists and was reaped (no zombie left)."""
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not Path(f"/proc/{pid}").exists()


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    """Poll ``await predicate()`` (state in another process: no event to wait on)."""
    with anyio.fail_after(timeout):
        while not await predicate():
            await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_invoke_returns_the_result_and_passes_ids_and_headers(work_root: Path) -> None:
    async with started(work_root, session_id="s1") as sandbox:
        assert sandbox.alive
        answer = await sandbox.invoke(call({"op": "echo", "x": [1, 2]}, **{"X-Test": "yes"}))
        assert answer["echo"] == {"op": "echo", "x": [1, 2]}
        assert answer["session_id"] == "s1"
        assert answer["request_id"].startswith("r-")
        assert answer["x_test"] == "yes"
        assert (await sandbox.ping())["status"] == "Healthy"
        facts = sandbox.describe()
        assert facts["pid"] == sandbox.pid
        assert facts["workdir"] == str(sandbox.workdir)
        assert facts["socket"].endswith("agent.sock")


@pytest.mark.anyio
@SERVERS
async def test_streamed_chunks_arrive_live_and_in_order(work_root: Path, server: str) -> None:
    async with started(work_root, server=server) as sandbox:
        begun = time.monotonic()
        stream = await sandbox.invoke(call({"op": "stream", "count": 5, "delay": 0.1}))
        arrivals: list[tuple[float, str]] = []
        async for chunk in stream:
            arrivals.append((time.monotonic() - begun, chunk))
        assert [chunk for _, chunk in arrivals] == [f"Chunk {i}" for i in range(1, 6)]
        # Live: the first chunk is there long before the last one is produced.
        assert arrivals[0][0] < arrivals[-1][0] - 0.25


@pytest.mark.anyio
async def test_stream_failure_raises_the_agents_error_after_the_chunks(work_root: Path) -> None:
    async with started(work_root) as sandbox:
        stream = await sandbox.invoke(call({"op": "stream", "count": 5, "fail_after": 2}))
        got: list[str] = []

        async def drain() -> None:
            async for chunk in stream:
                got.append(chunk)

        with pytest.raises(InvocationError, match="exploded after 2 chunks"):
            await drain()
        assert got == ["Chunk 1", "Chunk 2"]
        assert sandbox.alive


@pytest.mark.anyio
async def test_agent_error_is_reraised_and_the_sandbox_lives_on(work_root: Path) -> None:
    async with started(work_root) as sandbox:
        with pytest.raises(InvocationError, match="ValueError: kaput") as info:
            await sandbox.invoke(call({"op": "fail", "message": "kaput"}))
        assert info.value.status_code == 500
        assert sandbox.alive
        assert (await sandbox.invoke(call({"op": "count"}))) == 1


@pytest.mark.anyio
async def test_context_state_persists_across_turns_of_a_session(work_root: Path) -> None:
    async with started(work_root) as sandbox:
        assert [await sandbox.invoke(call({"op": "count"})) for _ in range(3)] == [1, 2, 3]
        assert await sandbox.invoke(call({"op": "count"}, session_id="other")) == 1


@pytest.mark.anyio
async def test_environment_is_scrubbed(work_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PPIO_ORCHESTRATOR_KEYS", "tenant:key")
    monkeypatch.setenv("SECRET_X", "hunter2")
    options = {"session_id": "s-env", "env": {"FROM_TEMPLATE": "t", "SHARED": "template"}}
    env_vars = {"FROM_SESSION": "s", "SHARED": "session"}
    async with started(work_root, env_vars=env_vars, **options) as sandbox:
        seen = await sandbox.invoke(call({"op": "env"}))
        env = seen["env"]
        assert "PPIO_ORCHESTRATOR_KEYS" not in env
        assert "SECRET_X" not in env
        assert env["FROM_TEMPLATE"] == "t"
        assert env["FROM_SESSION"] == "s"
        assert env["SHARED"] == "session"
        assert env["HOME"] == str(sandbox.workdir) == seen["cwd"]
        assert env["PPIO_SESSION_ID"] == "s-env"
        assert env["PPIO_AGENT_BIND"] == f"unix:{sandbox.describe()['socket']}"
        assert env["PYTHONUNBUFFERED"] == "1"
        allowed = {"PATH", "HOME", "LANG", "LC_ALL", "PYTHONPATH", "PYTHONUNBUFFERED"}
        allowed |= {"PPIO_AGENT_BIND", "PPIO_SESSION_ID", "FROM_TEMPLATE", "FROM_SESSION"}
        allowed |= {"SHARED", "LC_CTYPE"}  # LC_CTYPE: Python's own C-locale coercion
        allowed |= {"MALLOC_ARENA_MAX", "PWD"}  # PWD: bwrap sets it with --chdir
        assert set(env) <= allowed
        assert "ops_agent.py" in seen["files"]  # a copy of the template


def test_reserved_and_malformed_env_vars_are_rejected(work_root: Path) -> None:
    with pytest.raises(ValueError, match="PPIO_AGENT_BIND"):
        ProcessSandbox(
            AGENTS, "ops_agent.py", work_root=work_root, env_vars={"PPIO_AGENT_BIND": "x"}
        )
    with pytest.raises(ValueError, match="invalid environment variable name"):
        ProcessSandbox(AGENTS, "ops_agent.py", work_root=work_root, env={"A=B": "x"})
    with pytest.raises(FileNotFoundError):
        ProcessSandbox(AGENTS, "missing.py", work_root=work_root)


@pytest.mark.anyio
@SERVERS
async def test_close_stops_the_process_reaps_it_and_removes_the_workdir(
    work_root: Path, server: str
) -> None:
    sandbox = ProcessSandbox(AGENTS, "ops_agent.py", work_root=work_root, server=server)
    await sandbox.start()
    pid, workdir = sandbox.pid, sandbox.workdir
    assert pid is not None
    assert workdir is not None
    assert workdir.is_dir()
    async with anyio.create_task_group() as tg:  # concurrent and repeated closes are fine
        tg.start_soon(sandbox.close)
        tg.start_soon(sandbox.close)
    await sandbox.close()
    assert not sandbox.alive
    assert_gone(pid)
    assert not workdir.exists()
    with pytest.raises(SandboxCrashedError, match="closed"):
        await sandbox.invoke(call({"op": "echo"}))


@pytest.mark.anyio
async def test_kill_9_mid_turn_fails_the_turn_within_a_second(work_root: Path) -> None:
    async with started(work_root) as sandbox:
        pid = sandbox.pid
        assert pid is not None
        failure: list[BaseException] = []
        failed_at = 0.0

        async def turn() -> None:
            nonlocal failed_at
            try:
                await sandbox.invoke(call({"op": "sleep", "seconds": 30}))
            except SandboxCrashedError as exc:
                failed_at = time.monotonic()
                failure.append(exc)

        async def busy() -> bool:
            return bool((await sandbox.ping())["status"] == "HealthyBusy")

        async with anyio.create_task_group() as tg:
            tg.start_soon(turn)
            await wait_for(busy)
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
        assert failure, "the turn did not fail"
        assert failed_at - killed_at < 1.0
        assert "SIGKILL" in str(failure[0])
        assert not sandbox.alive
        with pytest.raises(SandboxCrashedError):
            await sandbox.invoke(call({"op": "echo"}))
    assert_gone(pid)


@pytest.mark.anyio
@SERVERS
async def test_kill_9_mid_stream_fails_the_stream_within_a_second(
    work_root: Path, server: str
) -> None:
    async with started(work_root, server=server) as sandbox:
        assert sandbox.pid is not None
        stream = await sandbox.invoke(call({"op": "ticks", "interval": 0.01}))
        await stream.__anext__()
        killed_at = time.monotonic()
        os.kill(sandbox.pid, signal.SIGKILL)
        with anyio.fail_after(2), pytest.raises(SandboxCrashedError, match="SIGKILL"):
            async for _ in stream:
                pass
        assert time.monotonic() - killed_at < 1.0
        assert not sandbox.alive


@pytest.mark.anyio
async def test_cancelling_a_turn_leaves_the_sandbox_usable(work_root: Path) -> None:
    # close_grace: short, in case the agent does not notice the disconnect (next test).
    async with started(work_root, close_grace=0.2) as sandbox:
        with anyio.move_on_after(0.3) as scope:
            await sandbox.invoke(call({"op": "sleep", "seconds": 30}))
        assert scope.cancelled_caught
        assert sandbox.alive
        assert await sandbox.invoke(call({"op": "count"})) == 1


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
@SERVERS
async def test_cancelling_a_turn_cancels_it_in_the_agent(work_root: Path, server: str) -> None:
    async with started(work_root, close_grace=0.2, server=server) as sandbox:
        with anyio.move_on_after(0.3):
            await sandbox.invoke(call({"op": "sleep", "seconds": 30}))

        async def idle() -> bool:
            return bool((await sandbox.ping())["status"] == "Healthy")

        await wait_for(idle, timeout=1.0)


@pytest.mark.anyio
@SERVERS
async def test_closing_a_stream_cancels_the_agents_generator(work_root: Path, server: str) -> None:
    async with started(work_root, server=server) as sandbox:
        stream = await sandbox.invoke(call({"op": "ticks"}))
        await stream.__anext__()
        await stream.__anext__()
        await stream.aclose()

        async def generator_cancelled() -> bool:
            return bool(await sandbox.invoke(call({"op": "cancelled"})) >= 1)

        await wait_for(generator_cancelled)
        assert sandbox.alive


@pytest.mark.anyio
async def test_pause_stops_progress_and_resume_continues(work_root: Path) -> None:
    async with started(work_root) as sandbox:
        stream = await sandbox.invoke(call({"op": "ticks", "interval": 0.02}))
        ticks: list[float] = []

        async def consume() -> None:
            async for tick in stream:
                ticks.append(tick)

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await wait_for(lambda: _at_least(ticks, 3))
            await sandbox.pause()
            await sandbox.pause()  # idempotent
            paused_at = time.monotonic()
            await anyio.sleep(0.4)  # observing that nothing happens takes time
            resumed_at = time.monotonic()
            await sandbox.resume()
            count = len(ticks)
            await wait_for(lambda: _at_least(ticks, count + 3))
            tg.cancel_scope.cancel()
        await stream.aclose()
        # The agent stamps each tick with the system-wide monotonic clock.
        assert not [t for t in ticks if paused_at + 0.01 < t < resumed_at]
        assert ticks[-1] > resumed_at
        assert sandbox.alive


async def _at_least(items: list[Any], n: int) -> bool:
    return len(items) >= n


@pytest.mark.anyio
async def test_close_works_on_a_paused_sandbox(work_root: Path) -> None:
    sandbox = ProcessSandbox(AGENTS, "ops_agent.py", work_root=work_root)
    await sandbox.start()
    pid = sandbox.pid
    assert pid is not None
    await sandbox.pause()
    begun = time.monotonic()
    await sandbox.close()
    assert time.monotonic() - begun < 2.0  # SIGCONT + SIGTERM: no wait for the grace
    assert_gone(pid)


@pytest.mark.anyio
@SERVERS
async def test_start_failure_reports_the_traceback_at_once(work_root: Path, server: str) -> None:
    sandbox = ProcessSandbox(
        AGENTS, "broken_agent.py", work_root=work_root, start_timeout=20, server=server
    )
    begun = time.monotonic()
    with pytest.raises(SandboxCrashedError) as info:
        await sandbox.start()
    assert time.monotonic() - begun < 5.0
    message = str(info.value)
    assert "exited with code" in message
    assert "RuntimeError: broken on purpose at import time" in message
    assert not sandbox.alive
    assert sandbox.workdir is not None
    assert not sandbox.workdir.exists()


@pytest.mark.anyio
async def test_start_failure_of_a_missing_command(work_root: Path) -> None:
    sandbox = ProcessSandbox(AGENTS, command=["/nonexistent/agent"], work_root=work_root)
    with pytest.raises(SandboxCrashedError, match="could not start"):
        await sandbox.start()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_memory_limit_fails_a_turn_that_allocates_too_much(work_root: Path) -> None:
    async with started(work_root, memory_limit=256 * MiB) as sandbox:
        assert sandbox.pid is not None
        cgroup = sandbox.cgroup
        if cgroup is not None and cgroup.plan.memory is not None:
            # A memory cgroup limits the whole sandbox: past it the kernel kills it.
            name = "memory.max" if cgroup.plan.memory.version == 2 else "memory.limit_in_bytes"
            limit_file = cgroup.plan.memory.base / cgroup.name / name
            assert int(await anyio.Path(limit_file).read_text()) == 256 * MiB
            assert await sandbox.invoke(call({"op": "alloc", "bytes": 16 * MiB})) == 16 * MiB
            with pytest.raises(SandboxCrashedError, match="out of memory"):
                await sandbox.invoke(call({"op": "alloc", "bytes": 2048 * MiB}))
            assert not sandbox.alive
            return
        # Without one, RLIMIT_AS: the allocation fails cleanly inside the agent.
        limits = await anyio.Path(f"/proc/{sandbox.pid}/limits").read_text()
        assert str(256 * MiB) in next(x for x in limits.splitlines() if "address space" in x)
        with pytest.raises(InvocationError, match="MemoryError"):
            await sandbox.invoke(call({"op": "alloc", "bytes": 2048 * MiB}))
        assert sandbox.alive
        assert await sandbox.invoke(call({"op": "alloc", "bytes": 16 * MiB})) == 16 * MiB


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_cpu_limit_is_a_quota_or_pins_the_process_to_that_many_cores(
    work_root: Path,
) -> None:
    async with started(work_root, cpu_limit=0.5) as sandbox:
        assert sandbox.pid is not None
        cgroup = sandbox.cgroup
        if cgroup is not None and cgroup.plan.cpu is not None:
            directory = anyio.Path(cgroup.plan.cpu.base / cgroup.name)
            if cgroup.plan.cpu.version == 2:
                assert (await (directory / "cpu.max").read_text()).split() == ["50000", "100000"]
            else:
                assert int(await (directory / "cpu.cfs_quota_us").read_text()) == 50_000
                assert int(await (directory / "cpu.cfs_period_us").read_text()) == 100_000
            assert str(sandbox.pid) in await (directory / "cgroup.procs").read_text()
        elif len(os.sched_getaffinity(0)) >= 2:
            assert len(os.sched_getaffinity(sandbox.pid)) == 1
        else:
            assert os.sched_getaffinity(sandbox.pid) == os.sched_getaffinity(0)


@pytest.mark.anyio
async def test_warm_pool_hands_out_started_processes_and_refills(work_root: Path) -> None:
    provider = ProcessSandboxProvider(AGENTS, "ops_agent.py", work_root=work_root, warm_pool=2)
    pids: set[int] = set()
    async with provider:
        pooled = provider.pooled
        assert len(pooled) == 2
        pids |= {sb.pid for sb in pooled if sb.pid is not None}
        # Two cold starts behind their walls: seconds on a busy machine.
        await wait_for(lambda: _all_answer_ping(provider.pooled), timeout=40)

        sandbox = await provider.create("s-warm")
        try:
            # The oldest pooled process, which answered /ping before create():
            # no cold start was waited for (whatever the machine's speed).
            assert sandbox is pooled[0]
            assert sandbox.describe()["pid"] in pids
            assert sandbox.describe()["session_id"] == "s-warm"
            answer = await sandbox.invoke(call({"op": "echo"}, session_id="s-warm"))
            assert answer["session_id"] == "s-warm"
            # The pool was refilled while the sandbox was handed out.
            assert len(provider.pooled) == 2
            pids |= {sb.pid for sb in provider.pooled if sb.pid is not None}
            assert len(pids) == 3
            # With env vars a session gets a cold process of its own.
            cold = await provider.create("s-cold", {"ONLY_ME": "1"})
            try:
                assert cold.describe()["pid"] not in pids
                env = (await cold.invoke(call({"op": "env"}, session_id="s-cold")))["env"]
                assert env["ONLY_ME"] == "1"
                assert env["PPIO_SESSION_ID"] == "s-cold"
            finally:
                await cold.close()
        finally:
            await sandbox.close()
        # Two cold starts behind their walls: seconds on a busy machine.
        await wait_for(lambda: _all_answer_ping(provider.pooled), timeout=40)
    assert provider.pooled == []
    for pid in pids:
        assert_gone(pid)


def test_the_sandbox_server_is_auto_when_uvicorn_is_installed_else_hypercorn() -> None:
    assert resolve_server("auto") == "auto"  # uvicorn and httptools: dev dependencies
    assert resolve_server("auto", python="/opt/other/python3") == "hypercorn"
    assert resolve_server("hypercorn") == "hypercorn"
    assert resolve_server("uvicorn", python="/opt/other/python3") == "uvicorn"
    with pytest.raises(ValueError, match="auto, hypercorn or uvicorn"):
        resolve_server("granian")
    assert pick_server("asyncio") == "uvicorn"
    assert pick_server("trio") == "hypercorn"


TRIO_AGENT = """\
from ppio_sandbox.agent_runtime import AgentConfig, PPIOAgentRuntimeApp

app = PPIOAgentRuntimeApp(config=AgentConfig(backend="trio"))


@app.entrypoint
async def agent(request, context):
    import sniffio

    return {"library": sniffio.current_async_library()}
"""


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
@pytest.mark.parametrize(
    ("server", "agent", "expected"),
    [
        ("hypercorn", "ops_agent.py", "hypercorn"),
        ("uvicorn", "ops_agent.py", "uvicorn"),
        ("auto", "ops_agent.py", "uvicorn"),
        ("auto", "trio_agent.py", "hypercorn"),  # uvicorn cannot run a trio app
    ],
)
async def test_a_providers_sandboxes_run_on_the_chosen_server(
    tmp_path: Path, work_root: Path, server: str, agent: str, expected: str
) -> None:
    template = tmp_path / "template"
    shutil.copytree(AGENTS, template)
    (template / "trio_agent.py").write_text(TRIO_AGENT)
    async with ProcessSandboxProvider(
        template, agent, work_root=work_root, server=server
    ) as provider:
        assert provider.describe()["server"] == server
        sandbox = await provider.create("s1")
        try:
            client = sandbox._client
            assert client is not None
            reply = await client.send("GET", "/ping")
            await reply.read()
            assert reply.header(b"server").decode().startswith(expected), reply.headers
            answer = await sandbox.invoke(call({"op": "echo"}))
            if agent == "trio_agent.py":
                assert answer == {"library": "trio"}
            else:
                assert answer["session_id"] == "s1"
        finally:
            await sandbox.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_warm_pool_skips_a_pooled_process_that_died(work_root: Path) -> None:
    async with ProcessSandboxProvider(
        AGENTS, "ops_agent.py", work_root=work_root, warm_pool=2
    ) as provider:
        first, second = provider.pooled
        assert first.pid is not None
        os.kill(first.pid, signal.SIGKILL)
        sandbox = await provider.create("s1")
        try:
            assert sandbox is second
            assert await sandbox.invoke(call({"op": "count"})) == 1
            assert "SIGKILL" in (provider.last_error or "")
        finally:
            await sandbox.close()
        assert_gone(first.pid)
        pids = [sb.pid for sb in provider.pooled]
    for pid in pids:
        assert pid is not None
        assert_gone(pid)


async def _all_answer_ping(sandboxes: list[ProcessSandbox]) -> bool:
    for sandbox in sandboxes:
        sock = sandbox.describe()["socket"]
        if not sock or not await anyio.Path(sock).exists():
            return False
        transport = httpx.AsyncHTTPTransport(uds=sock)
        async with httpx.AsyncClient(transport=transport, base_url="http://s") as client:
            try:
                if (await client.get("/ping")).status_code != 200:
                    return False
            except httpx.TransportError:
                return False
    return True


@pytest.mark.parametrize("bind", ["unix", "tcp"])
@pytest.mark.anyio
async def test_bedrock_agentcore_agent_runs_as_a_command(
    work_root: Path, bind: str, anyio_backend: str
) -> None:
    pytest.importorskip("bedrock_agentcore")
    if bind == "tcp" and anyio_backend == "trio":
        pytest.skip("one backend is enough for the TCP variant")
    session = "agentcore-session-" + "0" * 24  # AgentCore wants >= 33 characters
    async with started(
        work_root,
        entrypoint=None,
        command=[sys.executable, "agentcore_agent.py"],
        session_id=session,
        bind=bind,
    ) as sandbox:
        if bind == "tcp":
            assert sandbox.describe()["address"].startswith("127.0.0.1:")
        answer = await sandbox.invoke(call({"prompt": "hi"}, session_id=session))
        assert answer == {"echo": {"prompt": "hi"}}  # bare value, no envelope
        stream = await sandbox.invoke(call({"stream": True}, session_id=session))
        assert [chunk async for chunk in stream] == ["part 0", "part 1", "part 2"]
        assert (await sandbox.ping())["status"] == "Healthy"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_a_long_work_root_puts_the_socket_in_a_short_private_dir(tmp_path: Path) -> None:
    work_root = tmp_path / ("deep" * 30)
    async with started(work_root) as sandbox:
        sock = Path(sandbox.describe()["socket"])
        assert len(str(sock)) <= 100
        assert not sock.is_relative_to(work_root)
        assert await sandbox.invoke(call({"op": "count"})) == 1
    assert not sock.parent.exists()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_provider_calls_need_not_come_from_one_task(work_root: Path) -> None:
    provider = ProcessSandboxProvider(AGENTS, "ops_agent.py", work_root=work_root, warm_pool=1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(provider.open)  # a task that ends at once, as a request handler would
    sandbox = await provider.create("s1")
    await sandbox.close()
    pids = [sb.pid for sb in provider.pooled]
    assert len(pids) == 1
    async with anyio.create_task_group() as tg:
        tg.start_soon(provider.aclose)
    for pid in pids:
        assert pid is not None
        assert_gone(pid)
