"""The benchmark agents on bedrock-agentcore's ``BedrockAgentCoreApp``, as it ships.

Run by the peer's own virtual environment (see :mod:`benchmarks.peers`), never
imported by the harness. ``BedrockAgentCoreApp.run`` serves the app (a
Starlette subclass) on ``uvicorn.run`` with its defaults::

    python benchmarks/peers/bedrock_agentcore_agent.py --bind 127.0.0.1:8080 [--stream]

Without ``--stream``: ``examples/agent_runtime/simple_agent.py`` (one JSON
reply, a turn counter per ``X-PPIO-Session-Id``); with it: ``count`` chunks
(default 1000), yielding control between chunks.
"""

import argparse
import asyncio
from datetime import UTC, datetime

from bedrock_agentcore.runtime import BedrockAgentCoreApp

TURNS: dict = {}


async def simple_agent(request: dict, context) -> dict:
    query = request.get("query", "")
    result = f"Processed: {query}"
    session_id = context.session_id or context.request.headers.get("x-ppio-session-id")
    turns = TURNS[session_id] = TURNS.get(session_id, 0) + 1
    return {
        "response": result,
        "session_id": session_id,
        "timestamp": datetime.now(UTC).isoformat(),
        "turn": turns,
    }


async def stream_agent(request: dict, context):
    for index in range(int(request.get("count", 1000))):
        yield f"Chunk {index + 1}"
        await asyncio.sleep(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bind", required=True, help="host:port")
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()
    host, _, port = args.bind.rpartition(":")
    app = BedrockAgentCoreApp()
    app.entrypoint(stream_agent if args.stream else simple_agent)
    app.run(port=int(port), host=host)


if __name__ == "__main__":
    main()
