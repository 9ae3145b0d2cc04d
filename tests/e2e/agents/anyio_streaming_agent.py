"""A streaming test agent that only uses anyio, so it also runs on trio.

``{"count": N, "delay": s}`` yields ``"Chunk 1"`` .. ``"Chunk N"``, sleeping
``delay`` before each; with ``"fail_after": k`` it raises after ``k`` chunks.
``{"items": [...]}`` streams those values, one chunk each.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio

from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp, RequestContext

app = PPIOAgentRuntimeApp()


@app.entrypoint
async def streaming_agent(request: dict[str, Any], context: RequestContext) -> AsyncIterator[Any]:
    if "items" in request:  # stream arbitrary JSON values as given
        for item in request["items"]:
            yield item
        return
    count = int(request.get("count", 3))
    delay = float(request.get("delay", 0.0))
    fail_after = request.get("fail_after")
    for i in range(count):
        if fail_after is not None and i == int(fail_after):
            raise ValueError(f"exploded after {i} chunks")
        await anyio.sleep(delay)
        yield f"Chunk {i + 1}"
