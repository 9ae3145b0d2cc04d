"""In-process sandboxes: the agent's app called directly, no HTTP hop.

The template's agent file is imported once per orchestrator, as a module of
a package of its own (``ppio_tpl_<id>_<digest>``, see
:func:`~ppio_sandbox.agent_runtime.loader.load_isolated`): two templates, or
two versions of one, never share their modules. Every session of the
template calls its entrypoint with a ``context.state`` dict of its own.
Whatever the agent raises fails only that turn -- ``sys.exit()``,
``KeyboardInterrupt`` and other ``BaseException`` s too (an
``InvocationError`` naming what the agent did); at import they fail the
template's build. Only cancellation propagates. There is no process to
stop: ``pause`` holds the session's mailbox (the actor starts no turn), and
a running turn finishes.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import anyio.to_thread

from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp, RequestContext
from ppio_sandbox.agent_runtime._handlers import describe_failure, is_cancellation
from ppio_sandbox.agent_runtime.errors import InvocationError, SandboxCrashedError
from ppio_sandbox.agent_runtime.loader import find_app, load_isolated

from .base import Sandbox, SandboxProvider, TurnCall

__all__ = ["InProcessSandbox", "InProcessSandboxProvider"]

logger = logging.getLogger("ppio_sandbox.orchestrator")


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
            traceparent=call.traceparent,
        )
        try:
            return await self.app.invoke(call.payload, context)
        except Exception:
            raise
        except BaseException as exc:  # sys.exit() in the agent: this turn fails, nothing else
            if is_cancellation(exc):
                raise
            message = describe_failure(exc)
            logger.warning("session %s: %s; the turn failed", call.session_id, message)
            raise InvocationError(message) from exc

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
        package = "ppio_tpl_" + re.sub(r"\W", "_", self.template_id)
        path = self.directory / self.entrypoint

        def load() -> PPIOAgentRuntimeApp:
            try:
                return find_app(load_isolated(path, package))
            except BaseException as exc:
                # sys.exit() at import fails the build, not the server. Converted
                # here, in the worker thread: asyncio cannot hand a GeneratorExit
                # over to the waiting task (see agent_runtime._handlers.in_thread).
                raise SandboxCrashedError(
                    f"template {self.template_id}: loading {self.entrypoint} failed: "
                    f"{describe_failure(exc)}"
                ) from exc

        self.app = await anyio.to_thread.run_sync(load)

    async def create(self, session_id: str, env_vars: dict[str, str] | None = None) -> Sandbox:
        if self.app is None:
            await self.open()
        assert self.app is not None
        return InProcessSandbox(self.app)

    async def aclose(self) -> None:
        self.app = None
