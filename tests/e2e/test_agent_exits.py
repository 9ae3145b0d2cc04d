"""An agent that calls ``sys.exit()`` fails its request; the runtime serving it goes on.

``python -m ppio_sandbox.agent_runtime`` on each backend: ``SystemExit``,
``KeyboardInterrupt``, ``GeneratorExit`` and other ``BaseException`` s raised
by the entrypoint (started eagerly or behind middleware), by middleware, mid-
stream (async and sync generators) or by the ping handler answer 500 (or end
the stream with an error event), and the process keeps serving.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.e2e.helpers import AGENTS, Server

FAILURES = {
    "exit": "the agent called sys.exit(3)",
    "exit_none": "the agent called sys.exit()",
    "interrupt": "the agent raised KeyboardInterrupt: stop",
    "generator_exit": "the agent raised GeneratorExit",
    "base": "the agent raised BaseException: plain",
    "group": (
        "BaseExceptionGroup: two (the agent called sys.exit(4); the agent raised KeyboardInterrupt)"
    ),
}


def sse(text: str) -> list[tuple[str, object]]:
    """``(event, data)`` of each Server-Sent Event in a complete body."""
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        events.append((fields.get("event", "message"), json.loads(fields["data"])))
    return events


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("app", ["app", "app_mw"])
def test_sys_exit_in_an_agent_fails_its_request_and_the_runtime_goes_on(
    spawn: Callable[..., Server], backend: str, app: str
) -> None:
    server = spawn(AGENTS / "exiting_agent.py", backend=backend, app=app)
    fields = ["how", "middleware"] if app == "app_mw" else ["how"]
    with server.client() as client:
        for field in fields:
            for how, message in FAILURES.items():
                r = client.post("/invocations", json={field: how})
                assert r.status_code == 500, (field, how, r.text)
                error = r.json()["error"]
                assert (error["type"], error["message"]) == ("InvocationError", message)
        for field in ("stream", "sync_stream"):
            for how, message in FAILURES.items():
                r = client.post("/invocations", json={field: how})
                assert r.status_code == 200, r.text
                events = sse(r.text)
                assert events[:2] == [("message", {"i": 0}), ("message", {"i": 1})], r.text
                assert len(events) == 3, r.text
                kind, body = events[2]
                assert kind == "error"
                assert isinstance(body, dict)
                assert (body["error"]["type"], body["error"]["message"]) == (
                    "InvocationError",
                    message,
                )
        ping = client.get("/ping")  # the handler calls sys.exit(9)
        assert ping.status_code == 200, ping.text
        assert ping.json()["status"] == "Healthy"
        r = client.post("/invocations", json={})
        assert r.status_code == 200, r.text
        assert r.json()["result"] == {"ok": True}
    assert server.proc.poll() is None, server.output()
