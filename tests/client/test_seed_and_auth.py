"""The seed's client snippet, and both ways of authenticating, over real TCP."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import tcp_orchestrator

pytestmark = pytest.mark.anyio

KEYS = ["t:k1:secret1"]


async def test_seed_snippet_runs_as_written(tmp_path: Path) -> None:
    async with tcp_orchestrator(tmp_path, api_keys=KEYS) as base_url:
        # The seed, as a backend developer writes it.
        from ppio_sandbox.agent_runtime import AgentRuntimeClient, ClientConfig, InvocationRequest

        async with AgentRuntimeClient(
            api_key="k1", api_secret="secret1", config=ClientConfig(base_url=base_url)
        ) as client:
            response = await client.invoke_agent(
                template_id="echo",
                request=InvocationRequest(prompt="Hello, world!", data={"user_id": "123"}),
            )
            assert response.result["echo"] == "Hello, world!"
            assert response.status == "success"

            request = InvocationRequest(prompt="turn", data={"user_id": "123"})
            session = await client.create_session(template_id="echo", timeout_seconds=600)
            try:
                first = await session.invoke(request)
                second = await session.invoke(request)
            finally:
                await session.close()
            assert (first.result["turn"], second.result["turn"]) == (1, 2)
            assert first.result["session_id"] == session.session_id
            assert await client.list_sessions() == []  # one-shot and closed sessions are gone


async def test_bearer_and_hmac_are_both_accepted(tmp_path: Path) -> None:
    from ppio_sandbox.client import AgentRuntimeClient, ClientConfig

    async with tcp_orchestrator(tmp_path, api_keys=KEYS) as base_url:
        config = ClientConfig(base_url=base_url)
        for key, secret, scheme in (("secret1", None, "bearer"), ("k1", "secret1", "hmac")):
            async with AgentRuntimeClient(key, secret, config) as client:
                assert client.auth is not None
                assert client.auth.scheme == scheme
                assert (await client.invoke_agent("echo", "hi")).result["echo"] == "hi"
                templates = await client.list_templates()
                assert [t.template_id for t in templates if t.deployed]
                # A query string is signed too.
                runtime = await client.invoke_agent_runtime("echo", b"{}", qualifier="DEFAULT")
                assert runtime["statusCode"] == 200
                await client.close_session(runtime["runtimeSessionId"])


async def test_wrong_or_missing_credentials_raise_authentication_error(tmp_path: Path) -> None:
    from ppio_sandbox.client import AgentRuntimeClient, AuthenticationError, ClientConfig

    async with tcp_orchestrator(tmp_path, api_keys=KEYS) as base_url:
        config = ClientConfig(base_url=base_url)
        for key, secret in (("k1", "wrong-secret"), ("wrong-token", None), ("k2", "secret1")):
            async with AgentRuntimeClient(key, secret, config) as client:
                with pytest.raises(AuthenticationError) as caught:
                    await client.invoke_agent("echo", "hi")
                assert caught.value.status_code == 401
        async with AgentRuntimeClient(config=config) as anonymous:
            with pytest.raises(AuthenticationError, match="missing credentials"):
                await anonymous.list_templates()


async def test_credentials_and_base_url_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ppio_sandbox.client import AgentRuntimeClient

    async with tcp_orchestrator(tmp_path, api_keys=KEYS) as base_url:
        monkeypatch.setenv("PPIO_BASE_URL", base_url)
        monkeypatch.setenv("PPIO_API_KEY", "k1")
        monkeypatch.setenv("PPIO_API_SECRET", "secret1")
        async with AgentRuntimeClient() as client:
            assert client.config.base_url == base_url
            assert client.auth is not None
            assert client.auth.scheme == "hmac"
            assert (await client.invoke_agent("echo", "env")).result["echo"] == "env"
