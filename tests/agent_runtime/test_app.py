"""The invocation pipeline without HTTP: entrypoint kinds, middleware, ping."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest

from ppio_sandbox.agent_runtime import (
    InvocationRequest,
    PingStatus,
    PPIOAgentRuntimeApp,
    RequestContext,
    ValidationError,
)
from ppio_sandbox.agent_runtime.errors import ServiceUnavailableError

pytestmark = pytest.mark.anyio


def ctx(session_id: str | None = "s1", **kw: Any) -> RequestContext:
    return RequestContext(session_id=session_id, request_id="r1", **kw)


async def collect(stream: AsyncIterator[Any]) -> list[Any]:
    return [chunk async for chunk in stream]


async def test_async_entrypoint_with_context_gets_dict_unchanged() -> None:
    app = PPIOAgentRuntimeApp()
    seen: list[Any] = []

    @app.entrypoint
    async def agent(request: dict[str, Any], context: RequestContext) -> dict[str, Any]:
        seen.append((request, context.session_id))
        return {"ok": True}

    body = {"prompt": "p", "weird": [1, {"x": None}], "stream": False}
    assert await app.invoke(body, ctx()) == {"ok": True}
    assert seen == [(body, "s1")]
    assert seen[0][0] is body


async def test_sync_entrypoint_runs_in_worker_thread() -> None:
    app = PPIOAgentRuntimeApp()
    loop_thread = threading.get_ident()

    @app.entrypoint
    def agent(request: dict[str, Any]) -> int:
        return threading.get_ident()

    assert await app.invoke({}, ctx()) != loop_thread


async def test_async_generator_entrypoint_streams() -> None:
    app = PPIOAgentRuntimeApp()

    @app.entrypoint
    async def agent(request: dict[str, Any], context: RequestContext) -> AsyncIterator[str]:
        for i in range(3):
            yield f"Chunk {i + 1}"

    assert app.entrypoint_handler is not None
    assert app.entrypoint_handler.is_streaming
    assert await collect(await app.invoke({}, ctx())) == ["Chunk 1", "Chunk 2", "Chunk 3"]


async def test_sync_generator_streams_from_a_thread_and_closes() -> None:
    app = PPIOAgentRuntimeApp()
    loop_thread = threading.get_ident()
    closed = threading.Event()

    @app.entrypoint
    def agent(request: dict[str, Any]) -> Iterator[bool]:
        try:
            while True:
                yield threading.get_ident() != loop_thread
        finally:
            closed.set()

    stream = await app.invoke({}, ctx())
    got = []
    async for item in stream:
        got.append(item)
        if len(got) == 3:
            break
    await stream.aclose()
    assert got == [True, True, True]
    assert closed.is_set()


async def test_coroutine_returning_a_generator_is_streamed() -> None:
    app = PPIOAgentRuntimeApp()

    async def gen() -> AsyncIterator[int]:
        yield 1
        yield 2

    @app.entrypoint
    async def agent(request: dict[str, Any]) -> AsyncIterator[int]:
        return gen()

    assert await collect(await app.invoke({}, ctx())) == [1, 2]


async def test_no_entrypoint_is_service_unavailable() -> None:
    with pytest.raises(ServiceUnavailableError, match="no entrypoint"):
        await PPIOAgentRuntimeApp().invoke({}, ctx())


def test_entrypoint_without_parameters_is_rejected_at_registration() -> None:
    app = PPIOAgentRuntimeApp()
    with pytest.raises(TypeError, match="must accept the request"):
        app.entrypoint(lambda: None)


def test_middleware_with_wrong_arity_is_rejected_at_registration() -> None:
    app = PPIOAgentRuntimeApp()
    with pytest.raises(TypeError, match="context, request"):
        app.middleware(lambda a: None)


async def test_seed_middleware_rejects_then_allows() -> None:
    app = PPIOAgentRuntimeApp()

    @app.middleware
    async def auth_middleware(context: RequestContext, request: InvocationRequest) -> None:
        if not request.metadata.get("user_id"):
            raise ValidationError("User ID required")

    @app.entrypoint
    async def agent(request: dict[str, Any]) -> dict[str, Any]:
        return request

    with pytest.raises(ValidationError, match="User ID required"):
        await app.invoke({"prompt": "x"}, ctx())
    body = {"prompt": "x", "metadata": {"user_id": "u"}, "stream": False, "extra_field": 1}
    assert await app.invoke(body, ctx()) == body


async def test_middlewares_run_in_registration_order_and_can_replace_the_request() -> None:
    app = PPIOAgentRuntimeApp()
    order: list[str] = []

    @app.middleware
    async def first(context: RequestContext, request: InvocationRequest) -> InvocationRequest:
        order.append("first")
        request.prompt = (request.prompt or "") + "+first"
        return request

    @app.middleware
    def second(context: RequestContext, request: InvocationRequest) -> dict[str, Any]:
        order.append("second")
        return {**request.to_dict(), "prompt": request.prompt + "+second"}

    @app.entrypoint
    async def agent(request: dict[str, Any]) -> str:
        order.append("agent")
        return str(request["prompt"])

    assert await app.invoke({"prompt": "p"}, ctx()) == "p+first+second"
    assert order == ["first", "second", "agent"]


async def test_wrapping_middleware_sees_result_and_can_change_it() -> None:
    app = PPIOAgentRuntimeApp()
    calls: list[str] = []

    @app.middleware
    async def timing(context: RequestContext, request: InvocationRequest, call_next: Any) -> Any:
        calls.append("before")
        result = await call_next(request)
        calls.append("after")
        return {"wrapped": result, "request_id": context.request_id}

    @app.entrypoint
    async def agent(request: dict[str, Any]) -> str:
        calls.append("agent")
        return "inner"

    assert await app.invoke({}, ctx()) == {"wrapped": "inner", "request_id": "r1"}
    assert calls == ["before", "agent", "after"]


async def test_middleware_returning_garbage_is_a_type_error() -> None:
    app = PPIOAgentRuntimeApp()

    @app.middleware
    async def bad(context: RequestContext, request: InvocationRequest) -> int:
        return 42

    @app.entrypoint
    async def agent(request: dict[str, Any]) -> None:
        return None

    with pytest.raises(TypeError, match="returned int"):
        await app.invoke({}, ctx())


async def test_ping_is_healthy_then_busy_while_invoking_and_with_async_tasks() -> None:
    app = PPIOAgentRuntimeApp()
    assert (await app.ping_response()).status is PingStatus.HEALTHY
    app._begin()
    assert (await app.ping_response()).status is PingStatus.HEALTHY_BUSY
    app._end()
    assert (await app.ping_response()).status is PingStatus.HEALTHY
    task_id = app.add_async_task("job")
    assert (await app.ping_response()).status is PingStatus.HEALTHY_BUSY
    assert app.get_async_task_info()["active_count"] == 1
    assert app.complete_async_task(task_id) is True
    assert app.complete_async_task(task_id) is False
    assert (await app.ping_response()).status is PingStatus.HEALTHY


async def test_async_task_decorator_tracks_while_running() -> None:
    app = PPIOAgentRuntimeApp()
    started, release = anyio.Event(), anyio.Event()

    @app.async_task
    async def job() -> str:
        started.set()
        await release.wait()
        return "done"

    async with anyio.create_task_group() as tg:
        tg.start_soon(job)
        with anyio.fail_after(5):
            await started.wait()
        assert (await app.ping_response()).status is PingStatus.HEALTHY_BUSY
        release.set()
    assert (await app.ping_response()).status is PingStatus.HEALTHY


@pytest.mark.parametrize(
    ("answer", "status", "extra"),
    [
        ({"status": "healthy", "service": "My Agent"}, "Healthy", {"service": "My Agent"}),
        ({"status": "healthy_busy"}, "HealthyBusy", {}),
        (PingStatus.HEALTHY_BUSY, "HealthyBusy", {}),
        ("healthy", "Healthy", {}),
        ({"service": "no status"}, "Healthy", {"service": "no status"}),
        ({"status": "weird"}, "Healthy", {"reported_status": "weird"}),
        (None, "Healthy", {}),
    ],
)
async def test_custom_ping_answers_are_normalised(answer: Any, status: str, extra: Any) -> None:
    app = PPIOAgentRuntimeApp()
    app.ping(lambda: answer)
    body = (await app.ping_response()).to_dict()
    assert body.pop("status") == status
    assert isinstance(body.pop("time_of_last_update"), int)
    assert body == extra


async def test_failing_ping_handler_falls_back_to_automatic_status() -> None:
    app = PPIOAgentRuntimeApp()

    @app.ping
    async def broken() -> dict[str, str]:
        raise RuntimeError("db down")

    assert (await app.ping_response()).status is PingStatus.HEALTHY


async def test_time_of_last_update_moves_when_status_changes(monkeypatch: Any) -> None:
    app = PPIOAgentRuntimeApp()
    import ppio_sandbox.agent_runtime.app as app_module

    monkeypatch.setattr(app_module.time, "time", lambda: 2_000_000_000.0)
    first = (await app.ping_response()).time_of_last_update
    app._begin()
    busy = await app.ping_response()
    assert busy.time_of_last_update == 2_000_000_000 != first
