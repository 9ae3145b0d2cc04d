"""Benchmark agent: streams ``count`` small chunks (default 1000) as SSE.

The same agent as the peers' (``benchmarks/peers/``): ``"Chunk N"`` per
chunk, yielding control between chunks. Backend-neutral (anyio), so it runs
on asyncio and trio::

    python -m ppio_sandbox.agent_runtime benchmarks/agents/stream_agent.py --port 8080
"""

from collections.abc import AsyncIterator

import anyio.lowlevel

from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp, RequestContext

app = PPIOAgentRuntimeApp()


@app.entrypoint
async def stream_agent(request: dict, context: RequestContext) -> AsyncIterator[str]:
    for index in range(int(request.get("count", 1000))):
        yield f"Chunk {index + 1}"
        await anyio.lowlevel.checkpoint()
