"""An agent that streams its answer as Server-Sent Events, chunk by chunk.

Run it:  python examples/agent_runtime/streaming_agent.py
Call it: curl -N localhost:8080/invocations -H 'content-type: application/json' \
             -d '{"prompt": "count"}'
"""

import asyncio

from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp, RequestContext

app = PPIOAgentRuntimeApp()


@app.entrypoint
async def streaming_agent(request: dict, context: RequestContext):
    count = int(request.get("count", 10))
    delay = float(request.get("delay", 0.1))
    for i in range(count):
        await asyncio.sleep(delay)
        yield f"Chunk {i + 1}"


if __name__ == "__main__":
    app.run(port=8080)
