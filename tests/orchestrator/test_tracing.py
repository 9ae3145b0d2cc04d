"""OpenTelemetry tracing from the client through the orchestrator to the agent.

A real client calls a real orchestrator (hypercorn on a Unix socket) under a
span of its own; the spans the orchestrator records (the SDK's in-memory
exporter) and the ``RequestContext`` the agent sees must all be one trace:
client span -> request span (front door) -> turn span -> the agent's context.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ppio_sandbox.agent_runtime import RequestContext
from ppio_sandbox.client import AgentRuntimeClient, ClientConfig
from ppio_sandbox.orchestrator import _tracing

from .conftest import Running, orchestrator

ROOT = Path(__file__).resolve().parents[2]

AGENT = """\
import anyio
from opentelemetry import trace

from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp, RequestContext

app = PPIOAgentRuntimeApp()


def _seen(context: RequestContext) -> dict:
    current = trace.get_current_span().get_span_context()
    return {
        "traceparent": context.traceparent,
        "trace_id": context.trace_id,
        "current_span": f"{current.span_id:016x}" if current.is_valid else None,
    }


async def _chunks(context: RequestContext):
    for i in range(3):
        await anyio.sleep(0.01)
        yield {"i": i, **_seen(context)}


@app.entrypoint
async def agent(request: dict, context: RequestContext):
    if request.get("stream"):
        return _chunks(context)
    await anyio.sleep(float(request.get("sleep", 0)))
    return _seen(context)
"""

SPEC = """\
apiVersion: v1
kind: Agent
metadata:
  name: {name}
  version: "1.0.0"
spec:
  entrypoint: agent.py
  runtime:
    timeout: 10
  sandbox:
    kind: {kind}
"""


def _template(tmp_path: Path, kind: str) -> str:
    """A template whose agent answers with the trace context it was given."""
    name = f"traced-{kind}"
    directory = tmp_path / "templates" / name
    directory.mkdir(parents=True)
    (directory / "agent.py").write_text(AGENT)
    (directory / ".ppio-agent.yaml").write_text(SPEC.format(name=name, kind=kind))
    return str(directory)  # an absolute path: conftest's template_dir keeps it


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """The orchestrator's spans, kept in memory (the process's global provider untouched)."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    _tracing.configure(provider)
    try:
        yield spans
    finally:
        _tracing.configure(None)
        provider.shutdown()


@pytest.fixture
def tracer() -> trace.Tracer:
    """The client application's own tracer (a provider of its own: its spans are not exported)."""
    return TracerProvider().get_tracer("test-client")


@asynccontextmanager
async def _served(tmp_path: Path, kind: str) -> AsyncIterator[tuple[Running, AgentRuntimeClient]]:
    async with orchestrator(tmp_path, templates=(_template(tmp_path, kind),)) as o:
        client = AgentRuntimeClient(
            config=ClientConfig(base_url="http://orchestrator", timeout=20),
            transport=httpx.AsyncHTTPTransport(uds=str(o.sock)),
        )
        async with client:
            yield o, client


async def _clear(exporter: InMemorySpanExporter) -> None:
    """Forget the spans so far, once the session's creation (a request of its own) has
    ended its span: it ends after its reply, which the client may have read first."""
    with anyio.fail_after(5):
        while not any(s.name == "POST /v1/sessions" for s in exporter.get_finished_spans()):
            await anyio.sleep(0.01)
    exporter.clear()


async def _spans(exporter: InMemorySpanExporter, count: int) -> list[ReadableSpan]:
    """The finished spans once there are ``count`` (a request's span ends after its reply)."""
    with anyio.fail_after(5):
        while len(exporter.get_finished_spans()) < count:
            await anyio.sleep(0.01)
    await anyio.sleep(0.05)  # none more to come
    spans = list(exporter.get_finished_spans())
    assert len(spans) == count, [s.name for s in spans]
    return spans


def _hex(value: int, digits: int) -> str:
    return f"{value:0{digits}x}"


def _check_chain(
    spans: list[ReadableSpan], client_span: trace.Span | None, seen: dict[str, Any]
) -> tuple[ReadableSpan, ReadableSpan]:
    """The invocation's request span and turn span: one trace with the client's, and
    the agent saw the turn span's context."""
    requests = [s for s in spans if s.kind is trace.SpanKind.SERVER and "invocations" in s.name]
    turns = [s for s in spans if s.name.startswith("turn ")]
    assert len(requests) == 1, [s.name for s in spans]
    assert len(turns) == 1, [s.name for s in spans]
    request, turn = requests[0], turns[0]
    assert request.name == "POST /v1/sessions/{session_id}/invocations"
    assert request.context is not None
    assert turn.context is not None
    trace_id = request.context.trace_id
    if client_span is None:
        assert request.parent is None  # no context from the client: a new trace
    else:
        ours = client_span.get_span_context()
        assert trace_id == ours.trace_id
        assert request.parent is not None
        assert request.parent.span_id == ours.span_id
    assert turn.context.trace_id == trace_id
    assert turn.parent is not None
    assert turn.parent.span_id == request.context.span_id
    flags = _hex(turn.context.trace_flags, 2)  # sampled, and the SDK's random trace id bit
    assert turn.context.trace_flags.sampled
    expected = f"00-{_hex(trace_id, 32)}-{_hex(turn.context.span_id, 16)}-{flags}"
    assert seen["traceparent"] == expected
    assert seen["trace_id"] == _hex(trace_id, 32)
    assert request.attributes is not None
    assert turn.attributes is not None
    assert request.attributes["http.response.status_code"] == 200
    assert request.attributes["ppio.session_id"] == turn.attributes["ppio.session_id"]
    assert request.attributes["ppio.request_id"] == turn.attributes["ppio.request_id"]
    assert turn.attributes["ppio.turn.outcome"] == "ok"
    return request, turn


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["inprocess", "process"])
async def test_a_client_call_is_one_trace_down_to_the_agent(
    tmp_path: Path, exporter: InMemorySpanExporter, tracer: trace.Tracer, kind: str
) -> None:
    async with _served(tmp_path, kind) as (_, client):
        session = await client.create_session(f"traced-{kind}")
        await _clear(exporter)
        with tracer.start_as_current_span("client call") as client_span:
            reply = await session.invoke({"prompt": "hi"})
        seen = reply.result
        _, turn = _check_chain(await _spans(exporter, 2), client_span, seen)
        if kind == "inprocess":  # the turn's span is current while the agent runs
            assert turn.context is not None
            assert seen["current_span"] == _hex(turn.context.span_id, 16)


@pytest.mark.anyio
async def test_a_call_without_a_trace_starts_one(
    tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    async with _served(tmp_path, "inprocess") as (_, client):
        session = await client.create_session("traced-inprocess")
        await _clear(exporter)
        reply = await session.invoke({"prompt": "hi"})
        _check_chain(await _spans(exporter, 2), None, reply.result)


@pytest.mark.anyio
async def test_queued_turns_belong_to_the_trace_of_their_own_request(
    tmp_path: Path, exporter: InMemorySpanExporter, tracer: trace.Tracer
) -> None:
    """The first turn runs in its request's task; the others wait in the mailbox and
    run in the session's actor task, yet each is its own request's child."""
    async with _served(tmp_path, "inprocess") as (_, client):
        session = await client.create_session("traced-inprocess")
        await _clear(exporter)
        calls: dict[int, tuple[trace.Span, dict[str, Any]]] = {}

        async def call(i: int) -> None:
            with tracer.start_as_current_span(f"client call {i}") as span:
                reply = await session.invoke({"sleep": 0.2})
            calls[i] = (span, reply.result)

        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(call, i)
                await anyio.sleep(0.05)  # in this order
        spans = await _spans(exporter, 6)
        for span, seen in calls.values():
            trace_id = span.get_span_context().trace_id
            mine = [s for s in spans if s.context is not None and s.context.trace_id == trace_id]
            _check_chain(mine, span, seen)
        assert len({s.get_span_context().trace_id for s, _ in calls.values()}) == 3


@pytest.mark.anyio
async def test_a_streamed_turn_ends_its_span_when_the_stream_ends(
    tmp_path: Path, exporter: InMemorySpanExporter, tracer: trace.Tracer
) -> None:
    async with _served(tmp_path, "inprocess") as (_, client):
        session = await client.create_session("traced-inprocess")
        await _clear(exporter)
        with tracer.start_as_current_span("client stream") as client_span:
            chunks = [chunk async for chunk in session.stream({"stream": True})]
        assert [c["i"] for c in chunks] == [0, 1, 2]
        request, turn = _check_chain(await _spans(exporter, 2), client_span, chunks[0])
        assert turn.end_time is not None
        assert request.end_time is not None
        assert turn.end_time <= request.end_time  # the turn ended with its last chunk


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["inprocess", "process"])
async def test_with_the_api_alone_the_callers_context_still_reaches_the_agent(
    tmp_path: Path, kind: str
) -> None:
    """No provider records spans (the API's proxy): a call with a ``traceparent`` hands
    the caller's context on unchanged; one without is not traced at all."""
    assert not _tracing.recording()
    caller = f"00-{'ab' * 16}-{'cd' * 8}-01"
    async with _served(tmp_path, kind) as (o, client):
        session = await client.create_session(f"traced-{kind}")
        plain = await session.invoke({"prompt": "hi"})
        assert plain.result["traceparent"] is None
        r = await o.invoke(session.session_id, {"prompt": "hi"}, traceparent=caller)
        assert r.status_code == 200, r.text
        seen = r.json()
        seen = seen.get("result", seen)
        assert seen["traceparent"] == caller, seen
        assert seen["trace_id"] == "ab" * 16


@pytest.mark.anyio
async def test_a_failed_turn_is_an_error_span(
    tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    async with orchestrator(tmp_path) as o:
        sid = await o.session()
        await _clear(exporter)
        r = await o.invoke(sid, {"action": "fail"}, traceparent=f"00-{'ab' * 16}-{'cd' * 8}-01")
        assert r.status_code == 500
        spans = await _spans(exporter, 2)
        request = next(s for s in spans if s.kind is trace.SpanKind.SERVER)
        turn = next(s for s in spans if s.name.startswith("turn "))
        assert request.context is not None
        assert request.context.trace_id == int("ab" * 16, 16)
        assert request.parent is not None
        assert request.parent.span_id == int("cd" * 8, 16)
        assert request.status.status_code is trace.StatusCode.ERROR
        assert request.attributes is not None
        assert request.attributes["http.response.status_code"] == 500
        assert turn.status.status_code is trace.StatusCode.ERROR
        assert turn.attributes is not None
        assert turn.attributes["ppio.turn.outcome"] == "error"
        assert turn.attributes["error.type"] == "InvocationError"


def test_request_context_trace_id() -> None:
    good = f"00-{'0af7651916cd43dd8448eb211c80319c'}-b7ad6b7169203331-01"
    assert RequestContext(traceparent=good).trace_id == "0af7651916cd43dd8448eb211c80319c"
    for bad in (None, "", "garbage", f"00-{'0' * 32}-b7ad6b7169203331-01", "00-xyz-b7-01"):
        assert RequestContext(traceparent=bad).trace_id is None
    assert RequestContext().traceparent is None


# -- without OpenTelemetry -------------------------------------------------------------------------

_WITHOUT_OTEL = textwrap.dedent(
    """
    import importlib.abc, json, sys, tempfile
    from pathlib import Path

    class NoOpenTelemetry(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "opentelemetry" or name.startswith("opentelemetry."):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, NoOpenTelemetry())

    import anyio, httpx
    from ppio_sandbox.client import AgentRuntimeClient, ClientConfig
    from ppio_sandbox.orchestrator import _tracing
    from tests.orchestrator.conftest import orchestrator

    AGENT = '''
    from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp
    app = PPIOAgentRuntimeApp()

    @app.entrypoint
    async def agent(request, context):
        return {"traceparent": context.traceparent}
    '''

    async def main():
        with tempfile.TemporaryDirectory() as tmp:
            tpl = Path(tmp, "plain")
            tpl.mkdir()
            tpl.joinpath("agent.py").write_text(AGENT)
            tpl.joinpath(".ppio-agent.yaml").write_text(
                "apiVersion: v1\\nkind: Agent\\nmetadata:\\n  name: plain\\n"
                "spec:\\n  entrypoint: agent.py\\n  sandbox:\\n    kind: inprocess\\n"
            )
            async with orchestrator(Path(tmp), templates=(str(tpl),)) as o:
                config = ClientConfig(base_url="http://orchestrator", timeout=20)
                transport = httpx.AsyncHTTPTransport(uds=str(o.sock))
                async with AgentRuntimeClient(config=config, transport=transport) as client:
                    session = await client.create_session("plain")
                    reply = await session.invoke({"prompt": "hi"})
        loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
        print(json.dumps({"enabled": _tracing.ENABLED, "seen": reply.result, "loaded": loaded}))

    anyio.run(main, backend=sys.argv[1])
    """
)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_without_opentelemetry_nothing_is_traced_or_imported(backend: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_OTEL, backend],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"enabled": False, "seen": {"traceparent": None}, "loaded": []}
