"""Two agents with tight limits: 1 KiB bodies and a 0.5 s invocation timeout.

``async_app`` sleeps with ``anyio.sleep`` (or, given ``stream_every``,
streams a tick every that many seconds, forever); ``sync_app`` blocks with
``time.sleep`` (and so runs in a worker thread). Both sleep ``request["sleep"]``
seconds (default 0) and echo the body's size. Pick one with ``--app``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio

from ppio_sandbox.agent_runtime import AgentConfig, PPIOAgentRuntimeApp

async_app = PPIOAgentRuntimeApp(AgentConfig(max_request_size=1024, timeout=0.5))
sync_app = PPIOAgentRuntimeApp(AgentConfig(max_request_size=1024, timeout=0.5))


@async_app.entrypoint
async def async_agent(request: dict[str, Any]) -> Any:
    if "stream_every" in request:
        return _ticks(float(request["stream_every"]))
    await anyio.sleep(float(request.get("sleep", 0)))
    return {"keys": sorted(request)}


async def _ticks(every: float) -> AsyncIterator[int]:
    n = 0
    while True:
        await anyio.sleep(every)
        n += 1
        yield n


@sync_app.entrypoint
def sync_agent(request: dict[str, Any]) -> dict[str, Any]:
    time.sleep(float(request.get("sleep", 0)))
    return {"keys": sorted(request)}
