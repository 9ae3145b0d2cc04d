"""The sandbox interface: where a session's agent code runs.

Two kinds implement it: :class:`~.inprocess.InProcessSandbox` (the agent's
app is called directly inside the orchestrator) and
:class:`~.process.ProcessSandbox` (one OS process per session speaking the
runtime contract on a Unix socket). A :class:`SandboxProvider` per template
creates them (and may keep a warm pool).

Errors a sandbox raises from :meth:`Sandbox.invoke`, and only these:

* :class:`SandboxCrashedError` -- the sandbox died (or its connection broke)
  before or during the turn. ``sandbox.alive`` is False afterwards.
* any other :class:`PPIOAgentRuntimeError` -- the agent answered with an
  error envelope (or raised, in process), e.g. ``InvocationError`` (500),
  ``ValidationError`` (400): the turn fails, the sandbox lives on.

Cancellation (a cancel scope around ``invoke`` or around iterating the
stream) must stop the turn promptly: in process the agent's coroutine is
cancelled; over HTTP the connection is closed, which cancels the agent's
generator on the other side.
"""

from __future__ import annotations

import abc
from typing import Any

__all__ = ["Sandbox", "SandboxProvider", "TurnCall"]


class TurnCall:
    """One invocation handed to a sandbox.

    ``traceparent`` is the W3C trace context of the turn's span (``None`` when
    not traced): an in-process agent reads it as ``context.traceparent``, a
    process sandbox sends it as the ``traceparent`` header.
    """

    __slots__ = ("headers", "payload", "request_id", "session_id", "state", "traceparent")

    def __init__(
        self,
        payload: dict[str, Any],
        *,
        session_id: str,
        request_id: str,
        state: dict[str, Any],
        headers: dict[str, str] | None = None,
        traceparent: str | None = None,
    ) -> None:
        self.payload = payload
        self.session_id = session_id
        self.request_id = request_id
        self.state = state  # context.state for in-process agents
        self.headers = headers or {}
        self.traceparent = traceparent


class Sandbox(abc.ABC):
    """Runs one session's agent. Not shared between sessions."""

    kind: str = "abstract"

    @abc.abstractmethod
    async def start(self) -> None:
        """Make the sandbox ready (process started and answering /ping).

        Raises ``SandboxCrashedError`` (with the log tail in the message) when
        it cannot start within its deadline. Idempotent once started.
        """

    @abc.abstractmethod
    async def invoke(self, call: TurnCall) -> Any:
        """Run one turn; return the result, or an async iterator of chunks."""

    @abc.abstractmethod
    async def ping(self) -> dict[str, Any]:
        """The agent's ``/ping`` body (``{"status": "Healthy", ...}``)."""

    @abc.abstractmethod
    async def pause(self) -> None:
        """Stop the sandbox's CPU (SIGSTOP for a process). Idempotent."""

    @abc.abstractmethod
    async def resume(self) -> None:
        """Undo :meth:`pause`. Idempotent."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop everything the sandbox runs, promptly; idempotent; never raises."""

    @property
    @abc.abstractmethod
    def alive(self) -> bool:
        """False once the sandbox has died or been closed."""

    def describe(self) -> dict[str, Any]:
        """Facts for the session's API view (pid, socket, ...)."""
        return {"kind": self.kind}


class SandboxProvider(abc.ABC):
    """Creates the sandboxes of one template; owns any warm pool."""

    kind: str = "abstract"

    @abc.abstractmethod
    async def open(self) -> None:
        """Prepare (load the module, fill the warm pool in the background)."""

    @abc.abstractmethod
    async def create(self, session_id: str, env_vars: dict[str, str] | None = None) -> Sandbox:
        """A started sandbox for a new session (from the warm pool when possible)."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close the pool and every sandbox it still owns."""
