"""Calling agents from a backend with the client, as the seed README does.

Start an orchestrator hosting the example template first::

    ppio-sandbox-cli serve --template examples/templates/assistant

then run ``python examples/agent_runtime/client_example.py``. Without API keys
the orchestrator accepts anything on loopback. With ``--api-key t:k1:s3cret``
set ``PPIO_API_KEY=k1 PPIO_API_SECRET=s3cret`` (HMAC-signed requests) and,
to try a Bearer token too, ``PPIO_BEARER_TOKEN=s3cret`` (a key's secret is
its token). ``PPIO_BASE_URL`` names another orchestrator.

Every part of the seed's client code runs: configuration, a simple
invocation, a session invoked and closed, streaming, template discovery,
both ways to authenticate and the error classes.
"""

import asyncio
import os

from ppio_sandbox.agent_runtime import (
    AgentRuntimeClient,
    AuthenticationError,
    ClientConfig,
    InvocationError,
    InvocationRequest,
    PPIOAgentRuntimeError,
    SessionNotFoundError,
    TemplateNotFoundError,
)

TEMPLATE_ID = os.environ.get("TEMPLATE_ID", "assistant")
API_KEY = os.environ.get("PPIO_API_KEY")  # the access key id when a secret is set
API_SECRET = os.environ.get("PPIO_API_SECRET")
BEARER_TOKEN = os.environ.get("PPIO_BEARER_TOKEN")


async def main() -> None:
    # Client configuration
    config = ClientConfig(
        base_url=os.environ.get("PPIO_BASE_URL", "http://127.0.0.1:8900"),
        timeout=300,
        max_retries=3,
        enable_cache=True,
        cache_ttl=300,
    )
    # Using HMAC authentication (api_key alone would be sent as a Bearer token)
    async with AgentRuntimeClient(api_key=API_KEY, api_secret=API_SECRET, config=config) as client:
        print(f"Client: {client!r}")
        try:
            # Template discovery (cached for cache_ttl seconds)
            templates = await client.list_templates()
            print("Templates:", ", ".join(f"{t.name} ({t.phase})" for t in templates))

            # Simple invocation
            response = await client.invoke_agent(
                template_id=TEMPLATE_ID,
                request=InvocationRequest(prompt="Hello, world!", data={"user_id": "123"}),
            )
            print(f"Response: {response.result}")

            # Create and manage sessions manually
            session = await client.create_session(template_id=TEMPLATE_ID, timeout_seconds=600)
            try:
                for prompt in ("my name is Ada", "what is my name?"):
                    response = await session.invoke(InvocationRequest(prompt=prompt))
                    print(f"Session turn: {response.result}")
                # Streaming responses
                async for chunk in session.stream({"prompt": "stream this", "stream": True}):
                    print("chunk:", chunk)
            finally:
                await session.close()

            # A closed session is gone, and the error says so
            try:
                await session.invoke(InvocationRequest(prompt="are you there?"))
            except SessionNotFoundError as e:
                print(f"Session closed: {e}")
        except AuthenticationError:
            print("Authentication failed")
        except TemplateNotFoundError:
            print(f"Template {TEMPLATE_ID!r} not found: start the orchestrator with it")
        except InvocationError as e:
            print(f"Invocation failed: {e}")

        # Error handling: every error is a PPIOAgentRuntimeError of the server's own class
        try:
            await client.invoke_agent("no-such-agent", InvocationRequest(prompt="hi"))
        except TemplateNotFoundError as e:
            print(f"Template not found: {e}")
        except PPIOAgentRuntimeError as e:
            print(f"Unexpected {type(e).__name__}: {e}")

    # Using Bearer token
    if BEARER_TOKEN:
        async with AgentRuntimeClient(api_key=BEARER_TOKEN, config=config) as client:
            response = await client.invoke_agent(TEMPLATE_ID, InvocationRequest(prompt="bearer?"))
            print(f"Bearer response: {response.result}")


if __name__ == "__main__":
    asyncio.run(main())
