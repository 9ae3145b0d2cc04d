# mypy: disable-error-code="import-not-found,untyped-decorator"
"""Benchmark agent for ``agent-hosting``: a simulated model call, then a stream.

Each turn awaits ``think_ms`` milliseconds (the load generator draws it from
a fixed-seed distribution and sends it in the payload), costing no CPU, then
yields ``chunks`` small chunks (default 20) from an async generator. The
session's ``context.state`` counts its turns, as a multi-turn agent would
keep its history.
"""

from collections.abc import AsyncIterator
from typing import Any

import anyio

from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp, RequestContext

app = PPIOAgentRuntimeApp()

MAX_CHUNKS = 1000
CHUNKS = [f"token {i}" for i in range(MAX_CHUNKS)]


@app.entrypoint
async def agent(request: dict[str, Any], context: RequestContext) -> AsyncIterator[str]:
    think = float(request.get("think_ms", 0)) / 1000.0
    count = min(int(request.get("chunks", 20)), MAX_CHUNKS)
    context.state["turns"] = context.state.get("turns", 0) + 1
    if think > 0:
        await anyio.sleep(think)  # the model call: a wait, not work
    for chunk in CHUNKS[:count]:
        yield chunk
