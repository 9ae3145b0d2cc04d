"""Templates: the TTL cache, and deploying an agent directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import anyio
import httpx
import pytest

from ppio_sandbox.client import InvocationError, TemplateNotFoundError, ValidationError

from .conftest import client_for, drain, orchestrator

pytestmark = pytest.mark.anyio

STREAMER = Path(__file__).parent / "agents" / "streamer"


def counting(client_http: httpx.AsyncClient, path: str) -> list[str]:
    """Record the requests to ``path`` made from now on."""
    seen: list[str] = []

    async def hook(request: httpx.Request) -> None:
        if request.url.path == path:
            seen.append(request.method)

    client_http.event_hooks["request"].append(hook)
    return seen


async def test_a_second_list_within_the_ttl_makes_no_request(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o, client_for(o, cache_ttl=0.3) as client:
        seen = counting(client.http_client, "/v1/templates")
        first = await client.list_templates()
        second = await client.list_templates()
        assert [t.template_id for t in first] == [t.template_id for t in second]
        assert first[0].deployed
        assert first[0].name == "echo"
        assert len(seen) == 1
        await client.list_templates(refresh=True)
        assert len(seen) == 2
        client.templates.invalidate()
        await client.list_templates()
        assert len(seen) == 3
        await anyio.sleep(0.35)  # past the TTL
        await client.list_templates()
        assert len(seen) == 4

        one = counting(client.http_client, f"/v1/templates/{first[0].template_id}")
        assert (await client.get_template(first[0].template_id)).deployed
        assert one == []  # the listing cached the settled template
        with pytest.raises(TemplateNotFoundError):
            await client.get_template("nope")


async def test_without_the_cache_every_list_asks_the_server(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o, client_for(o, enable_cache=False) as client:
        seen = counting(client.http_client, "/v1/templates")
        for _ in range(3):
            await client.list_templates()
        assert len(seen) == 3


async def test_deploy_waits_for_the_build_and_the_agent_is_callable(tmp_path: Path) -> None:
    agent_dir = tmp_path / "streamer"
    shutil.copytree(STREAMER, agent_dir)
    async with orchestrator(tmp_path) as o, client_for(o) as client:
        before = await client.list_templates()
        template = await client.deploy_template(agent_dir)
        assert template.deployed
        assert template.name == "streamer"
        assert template.template_id.startswith("streamer-")
        after = await client.list_templates()  # the deploy invalidated the cache
        assert len(after) == len(before) + 1
        again = await client.deploy_template(agent_dir / ".ppio-agent.yaml")
        assert again.template_id == template.template_id  # same content, same id

        chunks = [c async for c in client.stream_agent("streamer", {"count": 2})]
        assert chunks == ["chunk 0", "chunk 1"]
        got: list[str] = []
        failing = client.stream_agent("streamer", {"count": 5, "fail_after": 2})
        with pytest.raises(InvocationError, match="gave up after 2 chunks"):
            await drain(failing, got)
        assert got == ["chunk 0", "chunk 1"]  # the chunks before the failure arrived

        await client.delete_template(template.template_id)
        with pytest.raises(TemplateNotFoundError):
            await client.get_template(template.template_id)


async def test_a_template_that_fails_its_build_raises_with_the_reason(tmp_path: Path) -> None:
    agent_dir = tmp_path / "broken"
    shutil.copytree(STREAMER, agent_dir)
    (agent_dir / "agent.py").write_text("raise ImportError('no such model')\n")
    async with orchestrator(tmp_path) as o, client_for(o) as client:
        with pytest.raises(ValidationError, match="no such model") as caught:
            await client.deploy_template(agent_dir)
        template_id = caught.value.details["template_id"]
        assert (await client.get_template(template_id)).phase == "failed"
