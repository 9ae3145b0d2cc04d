"""Process-sandbox test agent: ``{"op": ...}`` picks a behaviour.

Uses anyio only, so it behaves the same whichever backend its runtime runs.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio

from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp, RequestContext

app = PPIOAgentRuntimeApp()
cancelled_streams = 0


@app.entrypoint
async def agent(request: dict[str, Any], context: RequestContext) -> Any:
    op = request.get("op", "echo")
    if op == "echo":
        return {
            "echo": request,
            "session_id": context.session_id,
            "request_id": context.request_id,
            "x_test": context.headers.get("x-test"),
        }
    if op == "env":
        return {"env": dict(os.environ), "cwd": os.getcwd(), "files": sorted(os.listdir("."))}
    if op == "fail":
        raise ValueError(request.get("message", "boom"))
    if op == "count":
        context.state["n"] = context.state.get("n", 0) + 1
        return context.state["n"]
    if op == "alloc":
        data = bytearray(int(request["bytes"]))
        return len(data)
    if op == "sleep":
        await anyio.sleep(float(request["seconds"]))
        return "slept"
    if op == "stream":
        return chunks(int(request.get("count", 3)), float(request.get("delay", 0.0)), request)
    if op == "ticks":
        return ticks(float(request.get("interval", 0.02)))
    if op == "cancelled":
        return cancelled_streams
    raise ValueError(f"unknown op {op!r}")


async def chunks(count: int, delay: float, request: dict[str, Any]) -> AsyncIterator[str]:
    fail_after = request.get("fail_after")
    for i in range(count):
        if fail_after is not None and i == int(fail_after):
            raise RuntimeError(f"exploded after {i} chunks")
        await anyio.sleep(delay)
        yield f"Chunk {i + 1}"


async def ticks(interval: float) -> AsyncIterator[float]:
    """Endless: yields the (system-wide) monotonic clock every ``interval`` s."""
    global cancelled_streams
    try:
        while True:
            yield time.monotonic()
            await anyio.sleep(interval)
    finally:
        cancelled_streams += 1
