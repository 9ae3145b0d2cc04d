"""The blocking facade, from plain synchronous code."""

from __future__ import annotations

import threading

import httpx
import pytest

from ppio_sandbox.client import (
    ClientConfig,
    InvocationError,
    SessionNotFoundError,
    SyncAgentRuntimeClient,
)

from .conftest import Running


def sync_client(o: Running, backend: str = "asyncio", **config: object) -> SyncAgentRuntimeClient:
    return SyncAgentRuntimeClient(
        config=ClientConfig(base_url="http://orchestrator", **config),  # type: ignore[arg-type]
        transport=httpx.AsyncHTTPTransport(uds=str(o.sock)),
        backend=backend,
    )


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_sync_client_invokes_streams_and_manages_sessions(served: Running, backend: str) -> None:
    with sync_client(served, backend) as client:
        # The client's own event-loop thread (counting every thread of the
        # process would also count worker threads other tests left idle).
        loop_thread = client._portal.call(threading.current_thread)
        assert loop_thread is not threading.current_thread()
        assert loop_thread.name == "ppio-sandbox-client"
        assert loop_thread.is_alive()
        assert client.invoke_agent("echo", "hello").result["echo"] == "hello"
        assert [t.name for t in client.list_templates()] == ["echo"]
        chunks = list(client.stream_agent("echo", {"action": "stream", "count": 3}))
        assert chunks == [{"i": 0}, {"i": 1}, {"i": 2}]
        with client.invoke_agent("echo", {"action": "stream", "count": 2}, stream=True) as s:
            assert list(s) == [{"i": 0}, {"i": 1}]

        with client.create_session("echo", timeout_seconds=60) as session:
            assert session.invoke("one").result["turn"] == 1
            assert list(session.stream({"action": "stream", "count": 2})) == [{"i": 0}, {"i": 1}]
            assert session.invoke("three").result["turn"] == 3
            assert session.pause().status == "paused"
            assert session.resume().status == "ready"
            assert session.ping()["status"] == "Healthy"
        with pytest.raises(SessionNotFoundError):
            session.invoke("late")
        with pytest.raises(InvocationError, match="on purpose"):
            client.invoke_agent("echo", {"action": "fail"})
        runtime = client.invoke_agent_runtime("echo", b'{"prompt": "raw"}')
        assert runtime["response"]["echo"] == "raw"
        client.close_session(runtime["runtimeSessionId"])
    assert not loop_thread.is_alive()  # closing stopped the loop and joined its thread


def test_sync_client_is_shared_by_threads(served: Running) -> None:
    results: list[int] = []
    with sync_client(served) as client, client.create_session("echo") as session:

        def worker() -> None:
            results.append(session.invoke({"action": "sleep", "seconds": 0.05}).result["turn"])

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(results) == [1, 2, 3, 4]  # one session, turns in order
