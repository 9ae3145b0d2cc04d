"""Calling agents from a backend with the client, as the seed README does.

Start an orchestrator hosting the example template first::

    ppio-sandbox-cli serve --template examples/templates/assistant

then run ``python examples/agent_runtime/client_example.py``. Without API keys
the orchestrator accepts anything on loopback; with ``--api-key t:k1:s3cret``
pass ``api_key="k1", api_secret="s3cret"`` (HMAC) or ``api_key="s3cret"``
(Bearer), or set ``PPIO_API_KEY`` / ``PPIO_API_SECRET`` / ``PPIO_BASE_URL``.
"""

import asyncio
import os

from ppio_sandbox.agent_runtime import (
    AgentRuntimeClient,
    AuthenticationError,
    ClientConfig,
    InvocationError,
    InvocationRequest,
    TemplateNotFoundError,
)

TEMPLATE_ID = os.environ.get("TEMPLATE_ID", "assistant")


async def main() -> None:
    config = ClientConfig(
        base_url=os.environ.get("PPIO_BASE_URL", "http://127.0.0.1:8900"),
        timeout=300,
        max_retries=3,
        enable_cache=True,
        cache_ttl=300,
    )
    async with AgentRuntimeClient(config=config) as client:
        try:
            # Simple invocation
            response = await client.invoke_agent(
                template_id=TEMPLATE_ID,
                request=InvocationRequest(prompt="Hello, world!", data={"user_id": "123"}),
            )
            print(f"Response: {response.result}")

            # A multi-turn session
            session = await client.create_session(template_id=TEMPLATE_ID, timeout_seconds=600)
            try:
                for prompt in ("my name is Ada", "what is my name?"):
                    response = await session.invoke(InvocationRequest(prompt=prompt))
                    print(f"Session turn: {response.result}")
                async for chunk in session.stream({"prompt": "stream this", "stream": True}):
                    print("chunk:", chunk)
            finally:
                await session.close()
        except AuthenticationError:
            print("Authentication failed")
        except TemplateNotFoundError:
            print(f"Template {TEMPLATE_ID!r} not found: start the orchestrator with it")
        except InvocationError as e:
            print(f"Invocation failed: {e}")


if __name__ == "__main__":
    asyncio.run(main())
