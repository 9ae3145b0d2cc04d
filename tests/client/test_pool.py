"""The supervisor's pool: warm sessions kept, lost ones replaced, fair bounded waits."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.lowlevel
import httpx
import pytest
from anyio.abc import TaskStatus

from ppio_sandbox.client import (
    ClientConfig,
    InvocationTimeoutError,
    PoolStats,
    PoolTimeoutError,
    SandboxSession,
    SessionNotFoundError,
    SessionPool,
    SyncAgentRuntimeClient,
)
from ppio_sandbox.client._pool import HealthCheck

from .conftest import Running, client_for, orchestrator

pytestmark = pytest.mark.anyio


async def until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` past ``timeout``."""
    with anyio.move_on_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)
        return
    raise AssertionError(f"timed out waiting for {what}")


def server_sessions(o: Running) -> set[str]:
    return {s.session_id for s in o.host.list_sessions("default")}


async def test_min_idle_sessions_are_created_ahead_and_kept_as_sessions_are_taken(
    tmp_path: Path,
) -> None:
    async with (
        orchestrator(tmp_path) as o,
        client_for(o) as client,
        client.pool("echo", min_idle=2, max_size=8) as pool,
    ):
        await until(lambda: pool.stats().idle == 2, "two idle sessions")
        assert len(await client.list_sessions()) == 2
        async with pool.acquire() as a, pool.acquire() as b:
            assert a.session_id != b.session_id
            assert (await a.invoke("hi")).result["echo"] == "hi"
            # Both idle ones were taken: two more are made ready behind them.
            await until(lambda: pool.stats().idle == 2, "the pool to refill")
            assert pool.stats().in_use == 2
            assert len(server_sessions(o)) == 4
        stats = pool.stats()
        assert (stats.size, stats.idle, stats.in_use, stats.created) == (4, 4, 0, 4)
        assert isinstance(stats, PoolStats)


@pytest.mark.parametrize("check", ["status", "ping"])
async def test_a_session_closed_behind_the_pools_back_is_replaced_on_acquire(
    tmp_path: Path, check: HealthCheck
) -> None:
    async with (
        orchestrator(tmp_path) as o,
        client_for(o) as client,
        client.pool("echo", min_idle=1, max_size=2, check_interval=0, health_check=check) as pool,
    ):
        await until(lambda: pool.stats().idle == 1, "an idle session")
        (lost,) = server_sessions(o)
        r = await o.client.delete(f"/v1/sessions/{lost}")
        assert r.status_code == 200, r.text
        async with pool.acquire() as session:
            assert session.session_id != lost
            assert (await session.invoke("still here")).result["echo"] == "still here"
        assert pool.stats().replaced == 1
        assert lost not in server_sessions(o)


async def test_idle_sessions_are_recycled_before_their_idle_timeout(tmp_path: Path) -> None:
    async with (
        orchestrator(tmp_path) as o,
        client_for(o) as client,
        client.pool("echo", min_idle=1, max_size=1, timeout_seconds=0.6) as pool,
    ):
        await until(lambda: pool.stats().idle == 1, "an idle session")
        (first,) = server_sessions(o)
        # Margin: a quarter of 0.6 s; the pool recycles it at ~0.45 s, before the server.
        await until(lambda: pool.stats().replaced >= 1, "a recycle", timeout=3)
        await until(lambda: pool.stats().idle == 1, "a fresh idle session")
        async with pool.acquire() as session:
            assert session.session_id != first
            await session.invoke("fresh")
        assert first not in server_sessions(o)


async def test_max_size_holds_under_100_concurrent_acquirers_and_all_complete(
    tmp_path: Path,
) -> None:
    async with orchestrator(tmp_path) as o, client_for(o) as client:
        peak_server = peak_pool = 0
        done: list[int] = []
        async with client.pool("echo", min_idle=2, max_size=8) as pool:

            async def watch() -> None:
                nonlocal peak_server, peak_pool
                while True:
                    peak_server = max(peak_server, len(o.host.list_sessions("default")))
                    peak_pool = max(peak_pool, pool.stats().size)
                    await anyio.lowlevel.checkpoint()

            async def user(i: int) -> None:
                async with pool.acquire(timeout=10) as session:
                    reply = await session.invoke({"prompt": i, "action": "sleep", "seconds": 0.01})
                    assert reply.result["echo"] == i
                done.append(i)

            with anyio.fail_after(20):
                async with anyio.create_task_group() as watchers:
                    watchers.start_soon(watch)
                    async with anyio.create_task_group() as tg:
                        for i in range(100):
                            tg.start_soon(user, i)
                    watchers.cancel_scope.cancel()
            assert sorted(done) == list(range(100))
            assert 2 <= peak_server <= 8
            assert peak_pool <= 8
            assert pool.stats().waiting == 0


async def test_waiters_are_served_first_come_first_served(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o, client_for(o) as client:
        order: list[int] = []
        async with client.pool("echo", min_idle=1, max_size=1) as pool:

            async def waiter(i: int) -> None:
                async with pool.acquire(timeout=5) as session:
                    order.append(i)
                    await session.invoke(str(i))

            async with anyio.create_task_group() as tg, pool.acquire() as held:
                for i in range(5):
                    tg.start_soon(waiter, i)
                    await until(lambda n=i + 1: pool.stats().waiting == n, f"waiter {i}")
                await held.invoke("holder")
            assert order == [0, 1, 2, 3, 4]
            assert pool.stats().created == 1


async def test_acquire_gives_up_at_its_deadline_when_every_session_is_held(
    tmp_path: Path,
) -> None:
    async with (
        orchestrator(tmp_path) as o,
        client_for(o) as client,
        client.pool("echo", min_idle=0, max_size=2, acquire_timeout=0.3) as pool,
    ):
        async with pool.acquire(), pool.acquire():
            started = anyio.current_time()
            with pytest.raises(PoolTimeoutError) as caught:
                async with pool.acquire():
                    pass
            waited = anyio.current_time() - started
            # Not before its deadline; after it only by what a slow machine
            # adds (the sessions are never given back: a hang would be 30 s).
            assert 0.3 <= waited < 3
            assert isinstance(caught.value, InvocationTimeoutError)
            assert "size 2/2" in str(caught.value)
            reported = re.search(r"came free within (\d+\.\d+) s", str(caught.value))
            assert reported is not None, str(caught.value)
            assert 0.3 <= float(reported[1]) <= waited + 0.005  # the wait, to 2 decimals
            with pytest.raises(PoolTimeoutError):  # a per-call timeout too
                async with pool.acquire(timeout=0.05):
                    pass
        assert pool.stats().waiting == 0
        assert pool.stats().idle == 2


async def test_a_waiter_cancelled_as_it_is_handed_a_session_gives_it_back(
    tmp_path: Path,
) -> None:
    async with orchestrator(tmp_path) as o, client_for(o) as client:
        got: list[str] = []
        async with client.pool("echo", min_idle=1, max_size=1) as pool:
            first_scope = anyio.CancelScope()

            async def first() -> None:
                with first_scope:
                    async with pool.acquire(timeout=5) as session:
                        got.append(f"first {session.session_id}")

            async def second() -> None:
                async with pool.acquire(timeout=5) as session:
                    got.append(session.session_id)

            async with anyio.create_task_group() as tg:
                async with pool.acquire() as held:
                    tg.start_soon(first)
                    await until(lambda: pool.stats().waiting == 1, "the first waiter")
                    tg.start_soon(second)
                    await until(lambda: pool.stats().waiting == 2, "the second waiter")
                # Released: the session was handed to `first`, which has not run yet.
                assert pool.stats().waiting == 1
                first_scope.cancel()
            assert got == [held.session_id]  # the second waiter got it; none was lost
            stats = pool.stats()
            assert (stats.size, stats.idle, stats.in_use, stats.created) == (1, 1, 0, 1)


async def test_leaving_the_pool_closes_every_session_it_created(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o, client_for(o) as client:
        release = anyio.Event()

        async def holder(*, task_status: TaskStatus[SandboxSession]) -> None:
            async with pool.acquire() as session:
                await session.invoke("busy")
                task_status.started(session)
                await release.wait()  # still held when the pool closes

        async with anyio.create_task_group() as tg:
            async with client.pool("echo", min_idle=2, max_size=4) as pool:
                await until(lambda: pool.stats().idle == 2, "two idle sessions")
                held = await tg.start(holder)
                await until(lambda: pool.stats().size == 3, "a third session")
                assert pool.stats().in_use == 1
            assert server_sessions(o) == set()  # idle ones and the held one
            release.set()
        stats = pool.stats()
        assert (stats.size, stats.idle, stats.in_use, stats.closed) == (0, 0, 0, 3)
        assert await client.list_sessions() == []
        with pytest.raises(SessionNotFoundError):
            await held.invoke("after the pool")


async def test_pool_invoke_replaces_a_gone_session_and_runs_the_turn_again(
    tmp_path: Path,
) -> None:
    async with (
        orchestrator(tmp_path) as o,
        client_for(o) as client,
        client.pool("echo", min_idle=1, max_size=2, check_interval=60) as pool,
    ):
        await until(lambda: pool.stats().idle == 1, "an idle session")
        (lost,) = server_sessions(o)
        await (await client.get_session(lost)).close()  # behind the pool's back
        reply = await pool.invoke({"prompt": "once more"})  # not checked: found gone by the turn
        assert reply.result["echo"] == "once more"
        assert reply.result["session_id"] != lost
        assert pool.stats().replaced == 1
        chunks = [c async for c in pool.stream({"action": "stream", "count": 3})]
        assert chunks == [{"i": 0}, {"i": 1}, {"i": 2}]
        assert pool.stats().in_use == 0


async def test_a_stream_gives_its_session_back_when_it_ends_or_is_closed(
    tmp_path: Path,
) -> None:
    async with (
        orchestrator(tmp_path) as o,
        client_for(o) as client,
        client.pool("echo", min_idle=0, max_size=1) as pool,
    ):
        chunks = [c async for c in pool.stream({"action": "stream", "count": 2})]
        assert chunks == [{"i": 0}, {"i": 1}]
        assert pool.stats().in_use == 0
        assert (await pool.invoke("next")).result["turn"] == 2  # same session, given back
        first = set(server_sessions(o))
        # Closed half-way, the turn would go on running on the server (and the
        # next holder's turn would queue behind it): that session is replaced.
        async with pool.stream({"action": "stream", "count": 1000, "delay": 0.01}) as stream:
            assert await stream.__anext__() == {"i": 0}
            assert pool.stats().in_use == 1
            assert isinstance(stream.session, SandboxSession)
        assert pool.stats().in_use == 0
        assert pool.stats().replaced == 1
        with anyio.fail_after(2):  # not queued behind the abandoned 10 s stream
            reply = await pool.invoke("fresh")
        assert reply.result["turn"] == 1
        assert reply.result["session_id"] not in first


async def test_a_session_whose_turn_was_cut_off_is_not_handed_out_again(
    tmp_path: Path,
) -> None:
    async with (
        orchestrator(tmp_path) as o,
        client_for(o) as client,
        client.pool("echo", min_idle=1, max_size=1) as pool,
    ):

        async def slow_turn() -> None:
            async with pool.acquire() as session:
                await session.invoke({"action": "sleep", "seconds": 30}, timeout=0.2)

        with pytest.raises(InvocationTimeoutError):
            await slow_turn()
        await until(lambda: pool.stats().idle == 1, "a replacement")
        # Cancelled once its turn runs (not while the pool is handing it a session).
        with anyio.CancelScope() as cut:
            async with pool.acquire() as session:
                core = o.host.get_session("default", session.session_id).core
                async with anyio.create_task_group() as tg:
                    tg.start_soon(session.invoke, {"action": "sleep", "seconds": 30})
                    await until(lambda: core.running is not None, "the turn to start")
                    cut.cancel()
        assert cut.cancelled_caught
        assert pool.stats().replaced == 2  # cut off by its deadline, then by a cancellation
        with anyio.fail_after(2):  # not queued behind either 30 s turn
            reply = await pool.invoke("next")
        assert reply.result["turn"] == 1
        await until(lambda: len(server_sessions(o)) == 1, "the cut-off sessions closed")


async def test_a_session_named_by_the_caller_still_reports_session_not_found(
    tmp_path: Path,
) -> None:
    async with (
        orchestrator(tmp_path) as o,
        client_for(o) as client,
        client.pool("echo", min_idle=1, max_size=1) as pool,
    ):

        async def named_session_gone() -> None:
            async with pool.acquire() as session:
                await client.close_session(session.session_id)
                await session.invoke("gone")  # the caller named it: not replaced

        with pytest.raises(SessionNotFoundError):
            await named_session_gone()
        stats = pool.stats()
        assert stats.replaced == 1  # discarded on release, then replaced
        await until(lambda: pool.stats().idle == 1, "a replacement")
        assert len(server_sessions(o)) == 1


async def test_bad_arguments_and_misuse_are_clear_errors(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o, client_for(o) as client:
        with pytest.raises(ValueError, match="min_idle must be >= 0"):
            client.pool("echo", min_idle=-1)
        with pytest.raises(ValueError, match="max_size must be >= 1"):
            client.pool("echo", max_size=0)
        with pytest.raises(ValueError, match=r"min_idle \(3\) must not exceed max_size \(2\)"):
            client.pool("echo", min_idle=3, max_size=2)
        with pytest.raises(ValueError, match="health_check"):
            client.pool("echo", health_check="maybe")  # type: ignore[arg-type]
        pool = client.pool("echo", min_idle=0)
        assert isinstance(pool, SessionPool)
        with pytest.raises(RuntimeError, match="not started"):
            async with pool.acquire():
                pass
        async with pool:
            with pytest.raises(ValueError, match="timeout must be a positive"):
                async with pool.acquire(timeout=0):
                    pass
        with pytest.raises(RuntimeError, match="closed"):
            await pool.invoke("late")
        with pytest.raises(RuntimeError, match="already started"):
            async with pool:
                pass


async def test_a_pool_of_an_unknown_template_tells_the_acquirer_why(tmp_path: Path) -> None:
    async with (
        orchestrator(tmp_path) as o,
        client_for(o) as client,
        client.pool("nope", min_idle=1, max_size=1) as pool,
    ):
        with anyio.fail_after(5), pytest.raises(Exception, match="nope") as caught:
            async with pool.acquire(timeout=5):
                pass
        assert type(caught.value).__name__ == "TemplateNotFoundError"
        assert pool.stats().size == 0


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_blocking_facade_pools_sessions_too(served: Running, backend: str) -> None:
    config = ClientConfig(base_url="http://orchestrator")
    transport = httpx.AsyncHTTPTransport(uds=str(served.sock))
    with (
        SyncAgentRuntimeClient(config=config, transport=transport, backend=backend) as client,
        client.pool("echo", min_idle=1, max_size=1, acquire_timeout=0.2) as pool,
    ):
        with pool.acquire() as session:
            assert session.invoke("one").result["turn"] == 1
            with pytest.raises(PoolTimeoutError):
                pool.invoke("no session free")
        assert pool.invoke("two").result["turn"] == 2  # the same session, given back
        assert pool.stats().idle == 1
    assert served.host.list_sessions("default") == []
