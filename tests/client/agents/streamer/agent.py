"""Streams ``count`` chunks; with ``fail_after`` it raises after that many."""

from collections.abc import AsyncIterator
from typing import Any

from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp

app = PPIOAgentRuntimeApp()


@app.entrypoint
async def agent(request: dict[str, Any]) -> AsyncIterator[str]:
    fail_after = request.get("fail_after")
    for i in range(int(request.get("count", 3))):
        if fail_after is not None and i >= fail_after:
            raise RuntimeError(f"gave up after {i} chunks")
        yield f"chunk {i}"
