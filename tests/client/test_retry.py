"""Retries, transport failures and signing, against a scripted transport."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import pytest

from ppio_sandbox.agent_runtime.protocol import encode_json
from ppio_sandbox.agent_runtime.signing import verify_signature
from ppio_sandbox.client import (
    AgentRuntimeClient,
    AuthManager,
    ClientConfig,
    InvocationTimeoutError,
    RetryBudget,
    RetryPolicy,
    SandboxCrashedError,
    ServiceUnavailableError,
    TooManyRequestsError,
)

pytestmark = pytest.mark.anyio

OK = {"result": {"ok": True}, "status": "success", "duration": 0.0, "metadata": {}}
SESSION = {"session_id": "s1", "template_id": "echo", "status": "ready"}


def error(status: int, kind: str, **headers: str) -> httpx.Response:
    body = {"error": {"type": kind, "message": f"scripted {status}"}}
    return httpx.Response(status, json=body, headers=headers)


class Script:
    """A transport answering from a list; records every request it got."""

    def __init__(self, *answers: httpx.Response | Exception | Callable[[], Any]) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []
        self.times: list[float] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.times.append(time.monotonic())
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, httpx.Response)
        return answer

    def client(self, key: str | None = None, secret: str | None = None, **config: Any) -> Any:
        config.setdefault("retry_backoff", 0.01)
        return AgentRuntimeClient(
            key,
            secret,
            ClientConfig(base_url="http://scripted", **config),
            transport=httpx.MockTransport(self),
        )


async def test_a_retried_invocation_replays_the_same_bytes_and_key_signed_afresh() -> None:
    script = Script(
        error(503, "ServiceUnavailableError"),
        error(502, "SandboxCrashedError"),
        httpx.Response(200, json=OK),
    )
    async with script.client("k1", "secret1") as client:
        session_id = "conversation-1"
        response = await client.invoke_agent("echo", {"prompt": "hi"}, session_id=session_id)
    assert response.result == {"ok": True}
    posts = script.requests
    assert len(posts) == 3
    assert len({r.headers["Idempotency-Key"] for r in posts}) == 1
    assert {r.content for r in posts} == {encode_json({"prompt": "hi"})}
    assert len({r.headers["X-PPIO-Nonce"] for r in posts}) == 3  # signed per attempt
    for r in posts:
        verify_signature(
            r.method, r.url.raw_path.split(b"?")[0], r.url.query, r.headers, r.content,
            secret="secret1",
        )  # fmt: skip


async def test_a_turn_that_ran_out_of_time_is_not_replayed_but_a_gateway_timeout_is() -> None:
    # The orchestrator's 504 names the turn's own timeout: a replay would only
    # return that stored verdict, after a backoff.
    script = Script(error(504, "InvocationTimeoutError"), httpx.Response(200, json=OK))
    async with script.client() as client:
        with pytest.raises(InvocationTimeoutError, match="scripted 504"):
            await client.invoke_agent("echo", "hi", session_id="s")
    assert len(script.requests) == 1
    # A proxy's 504 (no envelope) says nothing about the turn: sent again.
    script = Script(httpx.Response(504, text="upstream timed out"), httpx.Response(200, json=OK))
    async with script.client() as client:
        response = await client.invoke_agent("echo", "hi", session_id="s")
    assert response.result == {"ok": True}
    assert len(script.requests) == 2


async def test_retry_after_is_honoured() -> None:
    script = Script(
        error(429, "TooManyRequestsError", **{"Retry-After": "0.3"}),
        httpx.Response(200, json=OK),
    )
    async with script.client() as client:
        await client.invoke_agent("echo", "hi", session_id="s")
    assert script.times[1] - script.times[0] >= 0.3


async def test_no_retry_past_the_deadline_or_the_retry_count() -> None:
    script = Script(error(429, "TooManyRequestsError", **{"Retry-After": "5"}))
    async with script.client() as client:
        started = time.monotonic()
        with pytest.raises(TooManyRequestsError) as caught:
            await client.invoke_agent("echo", "hi", session_id="s", timeout=1)
        assert time.monotonic() - started < 0.5  # did not sleep into the deadline
        assert caught.value.retry_after == 5
    script = Script(error(503, "ServiceUnavailableError"))
    async with script.client(max_retries=2) as client:
        with pytest.raises(ServiceUnavailableError):
            await client.list_templates()
    assert len(script.requests) == 3


async def test_creating_a_session_is_not_retried_once_the_server_may_have_acted() -> None:
    script = Script(error(502, "SandboxCrashedError"))
    async with script.client() as client:
        with pytest.raises(SandboxCrashedError):
            await client.create_session("echo")
    assert len(script.requests) == 1

    script = Script(httpx.ReadError("connection reset"))
    async with script.client() as client:
        with pytest.raises(ServiceUnavailableError, match="lost the connection"):
            await client.create_session("echo")
    assert len(script.requests) == 1

    # Refused before acting (503) or never reached (connect error): retried.
    script = Script(
        httpx.ConnectError("refused"),
        error(503, "ServiceUnavailableError"),
        httpx.Response(201, json=SESSION),
    )
    async with script.client() as client:
        session = await client.create_session("echo")
        assert session.session_id == "s1"
        assert len(script.requests) == 3


async def test_an_unreachable_server_is_service_unavailable_with_the_cause() -> None:
    script = Script(httpx.ConnectError("connection refused"))
    async with script.client(max_retries=2) as client:
        with pytest.raises(ServiceUnavailableError, match="cannot reach http://scripted") as caught:
            await client.invoke_agent("echo", "hi", session_id="s")
    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    assert len(script.requests) == 3

    # A real closed port, too.
    async with AgentRuntimeClient(
        config=ClientConfig(base_url="http://127.0.0.1:9", max_retries=0)
    ) as client:
        with pytest.raises(ServiceUnavailableError, match="cannot reach"):
            await client.list_templates()


async def test_a_reply_that_is_no_envelope_still_maps_by_status() -> None:
    script = Script(httpx.Response(502, text="<html>bad gateway</html>"))
    async with script.client(max_retries=0) as client:
        with pytest.raises(SandboxCrashedError, match=r"HTTP 502 .*bad gateway"):
            await client.list_templates()


async def test_a_hanging_server_hits_the_deadline() -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await anyio.sleep(10)
        raise AssertionError("unreachable")

    config = ClientConfig(base_url="http://scripted", timeout=0.3)
    async with AgentRuntimeClient(config=config, transport=httpx.MockTransport(hang)) as client:
        started = time.monotonic()
        with pytest.raises(InvocationTimeoutError):
            await client.list_templates()
        assert time.monotonic() - started < 0.8


def test_backoff_is_exponential_with_full_jitter_and_capped() -> None:
    top = RetryPolicy(base=0.1, cap=1.0, rng=lambda: 0.999999)
    assert [round(top.delay(n), 3) for n in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert RetryPolicy(rng=lambda: 0.0).delay(3) == 0.0
    policy = RetryPolicy()
    assert policy.retryable_status(503, idempotent=False)
    assert not policy.retryable_status(502, idempotent=False)
    assert policy.retryable_status(504, idempotent=True)
    assert not policy.retryable_status(500, idempotent=True)


def test_auth_manager_bearer_and_signature() -> None:
    request = httpx.Request(
        "POST", "http://h:8900/v1/sessions?b=2&a=1", content=b'{"x":1}',
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    assert AuthManager("tok").auth_headers(request) == {"Authorization": "Bearer tok"}
    signer = AuthManager("k1", "s3cret")
    first, second = signer.auth_headers(request), signer.auth_headers(request)
    assert first["X-PPIO-Nonce"] != second["X-PPIO-Nonce"]
    signed = verify_signature(
        "POST", "/v1/sessions", "a=1&b=2", {**request.headers, **first}, b'{"x":1}',
        secret="s3cret",
    )  # fmt: skip
    assert signed.access_key == "k1"
    with pytest.raises(ValueError, match="api_key"):
        AuthManager("")


# -- the retry budget -----------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def outage(budget: RetryBudget, clock: Clock, calls: int, *, every: float, retries: int = 3) -> int:
    """Retries ``budget`` allows over ``calls`` failing calls ``every`` seconds apart."""
    extra = 0
    for _ in range(calls):
        clock.now += every
        budget.deposit()
        for _ in range(retries):
            if not budget.try_withdraw():
                break
            extra += 1
    return extra


def test_the_retry_budget_holds_a_steady_outage_to_its_ratio() -> None:
    for ratio, calls in ((0.1, 500), (0.1, 1001), (0.2, 700), (0.05, 400)):
        clock = Clock()
        budget = RetryBudget(ratio, min_tokens=3, clock=clock)
        extra = outage(budget, clock, calls, every=0.002)
        assert extra <= ratio * calls, (ratio, calls, extra)
        assert extra >= 3  # the reserve still paid for the first failure's retries
        assert budget.refusals > 0
    # No ratio: the reserve alone, which rests while the outage lasts.
    clock = Clock()
    assert outage(RetryBudget(0.0, min_tokens=3, clock=clock), clock, 300, every=0.002) == 3
    # Deposits are capped: a long healthy spell does not buy an unbounded burst.
    clock = Clock()
    budget = RetryBudget(0.1, min_tokens=0, max_tokens=5, clock=clock)
    for _ in range(1000):
        budget.deposit()
    assert budget.tokens == 5
    assert outage(budget, clock, 1, every=0.0, retries=10) == 5


def test_the_budget_reserve_lets_a_quiet_client_retry() -> None:
    clock = Clock()
    budget = RetryBudget(0.1, min_tokens=2, clock=clock)
    # One failing call every half second: each is retried once, by the reserve.
    assert outage(budget, clock, 20, every=0.5, retries=1) == 20
    # Faster than the reserve refills: refused, and the reserve then rests...
    assert outage(budget, clock, 10, every=0.01, retries=1) <= 3
    rested = budget.tokens
    clock.now += 0.5
    assert budget.tokens == rested  # ...not refilled within a second of a refusal...
    clock.now += 1.0
    assert budget.tokens >= 2  # ...then back


def test_retry_budget_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="retry_budget_ratio must be a number >= 0"):
        ClientConfig(retry_budget_ratio=-0.1)
    with pytest.raises(ValueError, match="retry_budget_min_tokens"):
        ClientConfig(retry_budget_min_tokens=float("nan"))
    with pytest.raises(ValueError, match="retry_budget_max_tokens must be a number >= 1"):
        ClientConfig(retry_budget_max_tokens=0.5)
    with pytest.raises(ValueError, match="ratio must be a number >= 0"):
        RetryBudget(float("inf"))
    assert ClientConfig(retry_budget_ratio=None).retry_budget_ratio is None


async def test_one_client_shares_one_budget_and_fails_fast_once_it_is_spent() -> None:
    script = Script(error(503, "ServiceUnavailableError"))
    async with script.client(retry_budget_ratio=0.0, retry_budget_min_tokens=2) as client:
        with pytest.raises(ServiceUnavailableError):
            await client.invoke_agent("echo", "hi", session_id="s")
        assert len(script.requests) == 3  # two retries, all the reserve had
        with pytest.raises(ServiceUnavailableError):
            await client.list_templates()
        assert len(script.requests) == 4  # another call: no retry left
    # Without a budget only max_retries counts.
    script = Script(error(503, "ServiceUnavailableError"))
    async with script.client(retry_budget_ratio=None, max_retries=2) as client:
        for _ in range(5):
            with pytest.raises(ServiceUnavailableError):
                await client.list_templates()
    assert len(script.requests) == 15


class BrokenBody(httpx.AsyncByteStream):
    """A body that breaks after its first bytes."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'{"result": '
        raise httpx.ReadError("connection reset while reading the reply")


async def test_a_reply_lost_while_read_is_retried_only_when_idempotent() -> None:
    script = Script(httpx.Response(200, stream=BrokenBody()), httpx.Response(200, json=OK))
    async with script.client() as client:
        response = await client.invoke_agent("echo", "hi", session_id="s")
    assert response.result == {"ok": True}
    assert len(script.requests) == 2

    script = Script(httpx.Response(201, stream=BrokenBody()))
    async with script.client() as client:
        with pytest.raises(ServiceUnavailableError, match="lost the connection"):
            await client.create_session("echo")
    assert len(script.requests) == 1
