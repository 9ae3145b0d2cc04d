"""``PPIOAgentRuntimeApp``: the object an agent developer decorates and runs."""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from ._handlers import (
    Entrypoint,
    Middleware,
    build_chain,
    describe_failure,
    in_thread,
    is_cancellation,
)
from .config import AgentConfig
from .context import RequestContext, SessionStateStore
from .errors import ServiceUnavailableError
from .protocol import InvocationRequest, PingResponse, PingStatus

__all__ = ["AgentRuntimeApp", "PPIOAgentRuntimeApp"]

F = TypeVar("F", bound=Callable[..., Any])
logger = logging.getLogger("ppio_sandbox.agent_runtime")


class PPIOAgentRuntimeApp:
    """An agent wrapped as an HTTP service speaking the runtime contract.

    >>> app = PPIOAgentRuntimeApp()
    >>> @app.entrypoint
    ... async def agent(request: dict, context: RequestContext) -> dict:
    ...     return {"echo": request.get("prompt")}

    ``app.run(port=8080)`` serves it; the app is also a plain ASGI
    application (``await app(scope, receive, send)``), so any ASGI server can
    host it. :meth:`invoke` runs one invocation without HTTP, which is how the
    orchestrator's in-process sandbox calls it.
    """

    def __init__(self, config: AgentConfig | None = None, *, debug: bool | None = None) -> None:
        self.config = config or AgentConfig()
        if debug is not None:
            self.config.debug = debug
        self.states = SessionStateStore(self.config.max_session_states)
        self._entrypoint: Entrypoint | None = None
        self._ping_handler: Callable[[], Awaitable[Any]] | None = None
        self._middlewares: list[Middleware] = []
        self._active_invocations = 0
        self._async_tasks: dict[int, dict[str, Any]] = {}
        self._task_ids = itertools.count(1)
        self._last_status = PingStatus.HEALTHY
        self._last_status_change = int(time.time())
        self._asgi: Any = None

    # -- registration -------------------------------------------------------

    def entrypoint(self, func: F) -> F:
        """Register the agent: ``f(request)`` or ``f(request, context)``.

        Sync or async; returning a value replies JSON, returning (or being) a
        sync or async generator streams Server-Sent Events.
        """
        self._entrypoint = Entrypoint(func)
        return func

    def ping(self, func: F) -> F:
        """Register a custom health check.

        It may return a dict (``status`` normalised, other fields kept), a
        :class:`PingStatus`, a string such as ``"healthy"``, or ``None``. While
        invocations or tracked tasks run, ``/ping`` says HealthyBusy whatever
        the handler says; if the handler raises, ``/ping`` still answers.
        """
        target = inspect.unwrap(func)
        if inspect.iscoroutinefunction(target):
            self._ping_handler = func
        else:

            async def ping_in_thread() -> Any:
                return await anyio.to_thread.run_sync(in_thread, func)

            self._ping_handler = ping_in_thread
        return func

    def middleware(self, func: F) -> F:
        """Register a middleware; they run in registration order. See :class:`Middleware`."""
        self._middlewares.append(Middleware(func))
        return func

    # -- background work (AgentCore compatible) -----------------------------

    def add_async_task(self, name: str, metadata: dict[str, Any] | None = None) -> int:
        """Mark background work as running (``/ping`` says HealthyBusy); returns its id."""
        task_id = next(self._task_ids)
        self._async_tasks[task_id] = {
            "name": name,
            "metadata": metadata or {},
            "start": time.time(),
        }
        self._note_status()
        return task_id

    def complete_async_task(self, task_id: int) -> bool:
        """Mark background work as done; False when the id is unknown."""
        found = self._async_tasks.pop(task_id, None) is not None
        self._note_status()
        return found

    def async_task(self, func: F) -> F:
        """Decorate an async function so ``/ping`` reports HealthyBusy while it runs."""
        if not inspect.iscoroutinefunction(inspect.unwrap(func)):
            raise TypeError("@app.async_task needs an async function")

        @functools.wraps(func)
        async def tracked(*args: Any, **kwargs: Any) -> Any:
            task_id = self.add_async_task(getattr(func, "__name__", "task"))
            try:
                return await func(*args, **kwargs)
            finally:
                self.complete_async_task(task_id)

        return tracked  # type: ignore[return-value]

    def get_async_task_info(self) -> dict[str, Any]:
        """The running tracked tasks, for diagnostics."""
        now = time.time()
        jobs = [
            {"id": k, "name": v["name"], "duration": round(now - v["start"], 3)}
            for k, v in self._async_tasks.items()
        ]
        return {"active_count": len(jobs), "running_jobs": jobs}

    # -- invocation ---------------------------------------------------------

    @property
    def entrypoint_handler(self) -> Entrypoint | None:
        return self._entrypoint

    @property
    def active_invocations(self) -> int:
        return self._active_invocations

    def _begin(self) -> None:
        self._active_invocations += 1
        if self._active_invocations == 1 and self._last_status is PingStatus.HEALTHY:
            self._last_status = PingStatus.HEALTHY_BUSY
            self._last_status_change = int(time.time())

    def _end(self) -> None:
        self._active_invocations -= 1
        if self._active_invocations == 0 and not self._async_tasks:
            self._last_status = PingStatus.HEALTHY
            self._last_status_change = int(time.time())

    def start_invoke(self, payload: dict[str, Any], context: RequestContext) -> tuple[bool, Any]:
        """Begin an invocation without suspending where possible.

        Returns ``(True, result)`` if it already finished (a coroutine
        entrypoint that never awaited anything slow, with no middleware), else
        ``(False, awaitable)``. Raises what the agent raised.
        """
        entry = self._entrypoint
        if entry is not None and entry.eager and not self._middlewares:
            return entry.start(payload, context)
        return False, self.invoke(payload, context)

    async def invoke(self, payload: dict[str, Any], context: RequestContext) -> Any:
        """Run middleware and the entrypoint for one request.

        Returns the result, or an async iterator of chunks when the agent
        streams. Raises what the middleware or agent raised. No timeout is
        applied here: the caller owns the deadline.
        """
        entry = self._entrypoint
        if entry is None:
            raise ServiceUnavailableError(
                "no entrypoint registered: decorate one with @app.entrypoint"
            )
        if not self._middlewares:
            return await entry(payload, context)
        request = InvocationRequest.from_dict(payload)
        chain = build_chain(self._middlewares, entry, context, payload)
        return await chain(request)

    # -- health -------------------------------------------------------------

    def _automatic_status(self) -> PingStatus:
        if self._active_invocations or self._async_tasks:
            return PingStatus.HEALTHY_BUSY
        return PingStatus.HEALTHY

    def _note_status(self) -> None:
        status = self._automatic_status()
        if status is not self._last_status:
            self._last_status = status
            self._last_status_change = int(time.time())

    async def ping_response(self) -> PingResponse:
        """The ``/ping`` body: automatic status, refined by the custom handler."""
        status = self._automatic_status()
        extra: dict[str, Any] = {}
        if self._ping_handler is not None:
            try:
                answer = await self._ping_handler()
            except BaseException as exc:
                # Even sys.exit() in the handler: /ping answers, the server goes on.
                if is_cancellation(exc):
                    raise
                logger.warning(
                    "custom ping handler failed (%s); reporting automatic status",
                    describe_failure(exc),
                    exc_info=exc,
                )
                answer = None
            custom, extra = _parse_ping_answer(answer)
            if custom is PingStatus.HEALTHY_BUSY:
                status = custom
        if status is not self._last_status:
            self._last_status = status
            self._last_status_change = int(time.time())
        return PingResponse(
            status=status, time_of_last_update=self._last_status_change, extra=extra
        )

    # -- serving ------------------------------------------------------------

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """ASGI entry point (the lean handler in ``_asgi``)."""
        if self._asgi is None:
            from ._asgi import RuntimeASGI

            self._asgi = RuntimeASGI(self)
        await self._asgi(scope, receive, send)

    def run(
        self,
        port: int | None = None,
        host: str | None = None,
        *,
        bind: str | None = None,
        backend: str | None = None,
        **overrides: Any,
    ) -> None:
        """Serve until SIGTERM or SIGINT, then drain in-flight turns and return.

        ``$PPIO_AGENT_BIND`` (``unix:/path`` or ``host:port``) wins over the
        arguments, so an orchestrator can choose the address of any agent file.
        """
        from .server import serve_forever

        if port is not None:
            self.config.port = port
        if host is not None:
            self.config.host = host
        if bind is not None:
            self.config.bind = bind
        if backend is not None:
            self.config.backend = backend  # type: ignore[assignment]
        for key, value in overrides.items():
            if not hasattr(self.config, key):
                raise TypeError(f"unknown run() option {key!r}")
            setattr(self.config, key, value)
        self.config.__post_init__()
        serve_forever(self)


def _parse_ping_answer(answer: Any) -> tuple[PingStatus | None, dict[str, Any]]:
    if answer is None:
        return None, {}
    if isinstance(answer, PingResponse):
        return answer.status, dict(answer.extra)
    if isinstance(answer, dict):
        extra = {k: v for k, v in answer.items() if k not in ("status", "time_of_last_update")}
        if "status" not in answer:
            return None, extra
        try:
            return PingStatus.parse(answer["status"]), extra
        except ValueError:
            extra["reported_status"] = answer["status"]
            return None, extra
    try:
        return PingStatus.parse(answer), {}
    except ValueError:
        return None, {"reported_status": str(answer)}


AgentRuntimeApp = PPIOAgentRuntimeApp
