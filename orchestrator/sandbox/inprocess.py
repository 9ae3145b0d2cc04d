"""In-process sandboxes: the agent's app called directly, no HTTP hop.

The template's agent file is imported once per orchestrator, under a module
name of its own (``ppio_template_<id>``), and every session of the template
calls its entrypoint with a ``context.state`` dict of its own. An exception
fails only that turn. There is no process to stop: ``pause`` holds the
session's mailbox (the actor starts no turn), and a running turn finishes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import anyio.to_thread

from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp, RequestContext
from ppio_sandbox.agent_runtime.errors import SandboxCrashedError
from ppio_sandbox.agent_runtime.loader import find_app, load_agent_module

from .base import Sandbox, SandboxProvider, TurnCall

__all__ = ["InProcessSandbox", "InProcessSandboxProvider"]


class InProcessSandbox(Sandbox):
    """One session's handle on a shared in-process app."""

    kind = "inprocess"
    __slots__ = ("_alive", "app")

    def __init__(self, app: PPIOAgentRuntimeApp) -> None:
        self.app = app
        self._alive = True

    async def start(self) -> None:
        return None

    async def invoke(self, call: TurnCall) -> Any:
        metadata = call.payload.get("metadata")
        context = RequestContext(
            session_id=call.session_id,
            request_id=call.request_id,
            headers=call.headers,
            metadata=metadata if isinstance(metadata, dict) else {},
            state=call.state,
        )
        return await self.app.invoke(call.payload, context)

    async def ping(self) -> dict[str, Any]:
        return (await self.app.ping_response()).to_dict()

    async def pause(self) -> None:
        return None

    async def resume(self) -> None:
        return None

    async def close(self) -> None:
        self._alive = False

    @property
    def alive(self) -> bool:
        return self._alive


class InProcessSandboxProvider(SandboxProvider):
    """Loads the template's agent module once; hands out cheap sandboxes."""

    kind = "inprocess"

    def __init__(self, template_id: str, directory: Path, entrypoint: str) -> None:
        self.template_id = template_id
        self.directory = Path(directory)
        self.entrypoint = entrypoint
        self.app: PPIOAgentRuntimeApp | None = None

    async def open(self) -> None:
        if self.app is not None:
            return
        module_name = "ppio_template_" + re.sub(r"\W", "_", self.template_id)
        path = self.directory / self.entrypoint

        def load() -> PPIOAgentRuntimeApp:
            return find_app(load_agent_module(path, module_name))

        try:
            self.app = await anyio.to_thread.run_sync(load)
        except Exception as exc:
            raise SandboxCrashedError(
                f"template {self.template_id}: loading {self.entrypoint} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    async def create(self, session_id: str, env_vars: dict[str, str] | None = None) -> Sandbox:
        if self.app is None:
            await self.open()
        assert self.app is not None
        return InProcessSandbox(self.app)

    async def aclose(self) -> None:
        self.app = None
