"""Retries and stream resumption against injected faults, turn by turn counted.

A real orchestrator on a loopback port, the fault proxy (``faultproxy.py``)
in front of it, and the ``ledger`` agent, which appends each execution's
token to a file: so "the turn ran exactly once" is read back, not assumed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from ppio_sandbox.client import (
    AgentRuntimeClient,
    ClientConfig,
    IdempotencyConflictError,
    InvocationError,
    NotFoundError,
    ServiceUnavailableError,
    SessionBusyError,
    TemplateNotFoundError,
    ValidationError,
)

from .conftest import drain, tcp_orchestrator
from .faultproxy import CutStream, FaultProxy, Forward, Reply, ResetAfterReply

pytestmark = pytest.mark.anyio

LEDGER = Path(__file__).parent / "agents" / "ledger"
INVOCATIONS = "/invocations"


@dataclass
class Rig:
    proxy: FaultProxy
    ledger: Path

    def client(self, **config: Any) -> AgentRuntimeClient:
        config.setdefault("retry_backoff", 0.01)
        config.setdefault("timeout", 20)
        return AgentRuntimeClient(config=ClientConfig(base_url=self.proxy.base_url, **config))

    def request(self, **extra: Any) -> dict[str, Any]:
        """A turn with a fresh token, recorded in the ledger when it runs."""
        return {"ledger": str(self.ledger), "token": uuid.uuid4().hex[:8], **extra}

    def executions(self, token: str) -> int:
        lines = self.ledger.read_text().splitlines() if self.ledger.exists() else []
        return lines.count(token)


@asynccontextmanager
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async with (
        tcp_orchestrator(tmp_path, templates=(str(LEDGER),)) as base_url,
        FaultProxy(base_url) as proxy,
    ):
        yield Rig(proxy, tmp_path / "ledger.txt")


def same_call(requests: list[Any]) -> None:
    """Every attempt replayed the same bytes with the same Idempotency-Key."""
    assert len({r.headers["idempotency-key"] for r in requests}) == 1
    assert len({r.body for r in requests}) == 1


# -- a reset after the server executed the turn -------------------------------


async def test_a_reset_after_the_turn_ran_is_retried_and_the_turn_runs_once(
    tmp_path: Path,
) -> None:
    async with rig(tmp_path) as r, r.client() as client:
        # In a named session, one-shot, and streamed: each reply is lost once.
        r.proxy.inject(ResetAfterReply(), path=INVOCATIONS)
        named = r.request()
        response = await client.invoke_agent("ledger", named, session_id="conv-1")
        assert response.result == {"token": named["token"]}
        r.proxy.inject(ResetAfterReply(), path=INVOCATIONS)
        one_shot = r.request()
        response = await client.invoke_agent("ledger", one_shot)
        assert response.result == {"token": one_shot["token"]}
        r.proxy.inject(ResetAfterReply(), path=INVOCATIONS)
        streamed = r.request(stream=4)
        chunks = [c async for c in client.stream_agent("ledger", streamed, session_id="conv-1")]
        assert chunks == [{"token": streamed["token"], "i": i} for i in range(4)]

        for request in (named, one_shot, streamed):
            assert r.executions(request["token"]) == 1
            attempts = [q for q in r.proxy.seen_on(INVOCATIONS) if q.json() == request]
            assert len(attempts) == 2  # the lost reply, then the replay
            assert [q.fault for q in attempts] == [ResetAfterReply(), Forward()]
            same_call(attempts)
        assert r.proxy.forwarded == r.proxy.seen  # every attempt reached the orchestrator


# -- refusals the client retries ----------------------------------------------


async def test_a_503_burst_is_retried_until_it_passes(tmp_path: Path) -> None:
    async with rig(tmp_path) as r, r.client(max_retries=3) as client:
        r.proxy.inject(*[Reply.unavailable()] * 3, path=INVOCATIONS)
        request = r.request()
        response = await client.invoke_agent("ledger", request, session_id="burst")
        assert response.result == {"token": request["token"]}
        attempts = r.proxy.seen_on(INVOCATIONS)
        assert len(attempts) == 4
        same_call(attempts)
        assert r.executions(request["token"]) == 1

        # A second burst at once: the budget's reserve went on the first one.
        r.proxy.inject(*[Reply.unavailable()] * 2, path=INVOCATIONS)
        with pytest.raises(ServiceUnavailableError, match="injected by the fault proxy"):
            await client.invoke_agent("ledger", r.request(), session_id="burst")
        assert len(r.proxy.seen_on(INVOCATIONS)) == 4 + 1

    # A burst longer than max_retries: the last 503 is raised, nothing ran.
    async with rig(tmp_path / "long") as r, r.client(max_retries=3) as client:
        r.proxy.inject(*[Reply.unavailable()] * 4, path=INVOCATIONS)
        request = r.request()
        with pytest.raises(ServiceUnavailableError, match="injected by the fault proxy"):
            await client.invoke_agent("ledger", request, session_id="burst")
        assert len(r.proxy.seen_on(INVOCATIONS)) == 4
        assert r.executions(request["token"]) == 0


async def test_a_429_is_retried_after_the_time_it_names(tmp_path: Path) -> None:
    async with rig(tmp_path) as r, r.client() as client:
        r.proxy.inject(Reply.too_many(0.4), path=INVOCATIONS)
        request = r.request()
        started = time.monotonic()
        response = await client.invoke_agent("ledger", request, session_id="busy")
        assert response.result == {"token": request["token"]}
        first, second = r.proxy.seen_on(INVOCATIONS)
        assert second.at - first.at >= 0.4
        assert time.monotonic() - started < 2
        assert r.executions(request["token"]) == 1


# -- errors the client does not retry -----------------------------------------


async def test_non_retryable_errors_are_sent_exactly_once(tmp_path: Path) -> None:
    async with rig(tmp_path) as r, r.client() as client:

        async def once(error: type[Exception], call: Any) -> None:
            before = r.proxy.seen
            with pytest.raises(error):
                await call
            assert r.proxy.seen == before + 1, error

        # 400: a body that is no JSON object.
        await once(
            ValidationError,
            client.invoke_agent_runtime("ledger", b"{not json", runtimeSessionId="s-400"),
        )
        # 404: no such agent.
        await once(
            TemplateNotFoundError,
            client.invoke_agent("no-such-agent", r.request(), session_id="s-404"),
        )
        # 500: the agent raised (the turn ran once).
        failing = r.request(fail=True)
        await once(InvocationError, client.invoke_agent("ledger", failing, session_id="s-500"))
        assert r.executions(failing["token"]) == 1

        async with await client.create_session("ledger") as session:
            # 422: a key reused with another body.
            await session.invoke(r.request(), idempotency_key="key-1")
            await once(
                IdempotencyConflictError,
                session.invoke(r.request(), idempotency_key="key-1"),
            )
            # 409: strategy=reject while a turn runs.
            async with anyio.create_task_group() as tg:
                tg.start_soon(session.invoke, r.request(sleep=0.5))
                with anyio.fail_after(5):
                    while await session.get_status() != "busy":
                        await anyio.sleep(0.01)
                await once(SessionBusyError, session.invoke(r.request(), strategy="reject"))


# -- the retry budget ---------------------------------------------------------


async def test_a_sustained_outage_costs_at_most_a_tenth_more_requests(tmp_path: Path) -> None:
    calls = 500
    async with rig(tmp_path) as r, r.client(max_retries=3, retry_backoff=0.001) as client:
        r.proxy.default = Reply.unavailable()
        single = 0
        started = time.monotonic()
        for _ in range(calls):
            before = r.proxy.seen
            with pytest.raises(ServiceUnavailableError):
                await client.invoke_agent("ledger", {"prompt": "x"}, session_id="down")
            single += r.proxy.seen - before == 1
        elapsed = time.monotonic() - started
        extra = r.proxy.seen - calls
        print(f"retry amplification: {extra}/{calls} = {extra / calls:.1%} in {elapsed:.2f} s")
        assert 3 <= extra <= 0.10 * calls  # some retries were made, within the budget
        assert single >= 0.85 * calls  # most calls failed at once, without a retry
        assert r.proxy.forwarded == 0


async def test_an_isolated_burst_on_a_healthy_client_is_still_retried(tmp_path: Path) -> None:
    async with rig(tmp_path) as r, r.client(max_retries=3) as client:
        for _ in range(30):  # a healthy client: 30 calls save 3 retries
            await client.invoke_agent("ledger", {"prompt": "ok"}, session_id="healthy")
        r.proxy.inject(*[Reply.unavailable()] * 6, path=INVOCATIONS)
        requests = [r.request() for _ in range(3)]
        results: list[Any] = []

        async def call(request: dict[str, Any]) -> None:
            response = await client.invoke_agent("ledger", request, session_id=request["token"])
            results.append(response.result)

        async with anyio.create_task_group() as tg:
            for request in requests:
                tg.start_soon(call, request)
        assert sorted(x["token"] for x in results) == sorted(q["token"] for q in requests)
        assert len(r.proxy.seen_on(INVOCATIONS)) == 30 + 3 + 6
        assert all(r.executions(q["token"]) == 1 for q in requests)


# -- stream resumption ----------------------------------------------------------


@pytest.mark.parametrize(
    ("how", "delay"),
    [("reset", 0.05), ("close", 0.0), ("end", 0.05)],
    ids=["reset-live", "close-after-turn", "early-end-live"],
)
async def test_a_cut_stream_resumes_after_the_last_event(
    tmp_path: Path, how: Any, delay: float
) -> None:
    async with rig(tmp_path) as r, r.client() as client:
        r.proxy.inject(CutStream(events=2, tail=7, how=how), path=INVOCATIONS)
        request = r.request(stream=6, delay=delay)
        stream = client.stream_agent("ledger", request, session_id="resume")
        chunks = [c async for c in stream]
        assert chunks == [{"token": request["token"], "i": i} for i in range(6)]
        assert stream.resumes == 1
        assert stream.summary is not None
        assert stream.summary["chunks"] == 6
        first, second = r.proxy.seen_on(INVOCATIONS)
        assert "last-event-id" not in first.headers
        assert second.headers["last-event-id"] == "2"
        same_call([first, second])
        assert r.executions(request["token"]) == 1


async def test_a_stream_resumes_as_often_as_it_breaks_within_max_retries(
    tmp_path: Path,
) -> None:
    async with rig(tmp_path) as r, r.client(max_retries=3) as client:
        r.proxy.inject(
            CutStream(events=0),  # before the first event
            CutStream(events=2, tail=3, how="close"),  # then after event 2...
            CutStream(events=1),  # ...and 3
            path=INVOCATIONS,
        )
        request = r.request(stream=5, delay=0.02)
        response = await client.invoke_agent("ledger", request, session_id="flaky")
        assert response.result == [{"token": request["token"], "i": i} for i in range(5)]
        attempts = r.proxy.seen_on(INVOCATIONS)
        assert [q.headers.get("last-event-id") for q in attempts] == [None, None, "2", "3"]
        same_call(attempts)
        assert r.executions(request["token"]) == 1

    # Out of retries: the break is raised, after the chunks that did arrive.
    async with rig(tmp_path / "strict") as r, r.client(max_retries=1) as client:
        r.proxy.inject(CutStream(events=1), CutStream(events=1), path=INVOCATIONS)
        request = r.request(stream=5)
        got: list[Any] = []
        with pytest.raises(ServiceUnavailableError, match="lost the connection"):
            await drain(client.stream_agent("ledger", request, session_id="flaky"), got)
        assert got == [{"token": request["token"], "i": i} for i in range(2)]
        assert len(r.proxy.seen_on(INVOCATIONS)) == 2
        assert r.executions(request["token"]) == 1


async def test_a_turn_the_server_no_longer_has_is_not_resumed_but_reported(
    tmp_path: Path,
) -> None:
    async with rig(tmp_path) as r, r.client() as client:
        # The server refuses to resume a key it does not know (it would run the
        # turn again and splice two runs' events): a 404 naming why, nothing ran.
        request = r.request(stream=3)
        async with httpx.AsyncClient(base_url=r.proxy.base_url) as raw:
            reply = await raw.post(
                "/v1/agents/ledger/invocations",
                json=request,
                headers={"Idempotency-Key": "never-seen", "Last-Event-ID": "2"},
            )
        assert reply.status_code == 404
        assert reply.json()["error"]["type"] == "NotFoundError"
        assert r.executions(request["token"]) == 0

        # The client raises it once the stream was cut and the turn forgotten.
        request = r.request(stream=4)
        before = len(r.proxy.seen_on(INVOCATIONS))
        r.proxy.inject(
            CutStream(events=2),
            Forward(headers=(("Idempotency-Key", "forgotten"),)),
            path=INVOCATIONS,
        )
        got: list[Any] = []
        with pytest.raises(NotFoundError, match="cannot resume after event 2"):
            await drain(client.stream_agent("ledger", request, session_id="forgetful"), got)
        assert got == [{"token": request["token"], "i": i} for i in range(2)]
        assert len(r.proxy.seen_on(INVOCATIONS)) == before + 2  # a 404 is not retried
        assert r.executions(request["token"]) == 1
