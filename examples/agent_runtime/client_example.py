"""Calling agents from a backend with the client module.

The client (``AgentRuntimeClient``) talks to an orchestrator; it is built by a
later milestone. Until then this example calls a standalone runtime directly
with httpx, which is what the client does under the hood.

Run ``python examples/agent_runtime/simple_agent.py`` first, then this file.
"""

import asyncio
import os

import httpx

BASE_URL = os.environ.get("AGENT_URL", "http://127.0.0.1:8080")


async def main() -> None:
    async with httpx.AsyncClient(base_url=BASE_URL, timeout=30) as http:
        reply = await http.post(
            "/invocations",
            json={"query": "Hello, world!", "metadata": {"user_id": "123"}},
            headers={"X-PPIO-Session-Id": "example-session"},
        )
        reply.raise_for_status()
        print("Response:", reply.json()["result"])


if __name__ == "__main__":
    asyncio.run(main())
