"""Adapters that turn user functions into uniform async callables.

All signature inspection happens here, once, when a function is registered;
the request path only calls the adapters.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Iterator
from typing import Any

import anyio
import anyio.to_thread

from .context import RequestContext
from .errors import InvocationError
from .protocol import InvocationRequest

__all__ = [
    "Entrypoint",
    "Middleware",
    "NextHandler",
    "build_chain",
    "describe_failure",
    "in_thread",
    "is_cancellation",
    "iterate_in_thread",
]

NextHandler = Callable[[InvocationRequest], Awaitable[Any]]
_DONE = object()


def is_cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` is the running event loop's cancellation (or a group holding one).

    Everything else an agent raises -- ``SystemExit`` from ``sys.exit()``,
    ``KeyboardInterrupt``, ``GeneratorExit`` -- fails only its own turn:
    an agent cannot stop the server it runs in. Cancellation must propagate.
    """
    cancelled = anyio.get_cancelled_exc_class()
    if isinstance(exc, cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(lambda e: isinstance(e, cancelled)) is not None
    return False


def describe_failure(exc: BaseException) -> str:
    """What the agent did, for an ``InvocationError`` message.

    >>> describe_failure(SystemExit(3))
    'the agent called sys.exit(3)'
    >>> describe_failure(ValueError("bad input"))
    'ValueError: bad input'
    """
    if isinstance(exc, SystemExit):
        code = "" if exc.code is None else repr(exc.code)
        return f"the agent called sys.exit({code})"
    if isinstance(exc, BaseExceptionGroup):
        inner = "; ".join(describe_failure(e) for e in exc.exceptions)
        return f"{type(exc).__name__}: {exc.message} ({inner})"
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if isinstance(exc, Exception) else f"the agent raised {text}"


def in_thread(func: Callable[..., Any], *args: Any) -> Any:
    """Call agent code in a worker thread (``anyio.to_thread.run_sync(in_thread, f, ...)``).

    A ``GeneratorExit`` it raises comes back as an ``InvocationError``:
    asyncio hands a thread's exception to the waiting task by *throwing* it
    into the task's coroutine, and a thrown ``GeneratorExit`` closes every
    coroutine of the task instead of propagating -- no handler could keep
    the server alive. Every other exception crosses unchanged.
    """
    try:
        return func(*args)
    except GeneratorExit as exc:
        raise InvocationError(describe_failure(exc)) from exc


def _positional_arity(func: Callable[..., Any]) -> int:
    """How many positional arguments ``func`` takes (``*args`` counts as many)."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return 1
    count = 0
    for p in params:
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            return 99
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            count += 1
    return count


def _unwrap(func: Callable[..., Any]) -> Callable[..., Any]:
    while isinstance(func, functools.partial):
        func = func.func
    unwrapped: Callable[..., Any] = inspect.unwrap(func)
    return unwrapped


async def iterate_in_thread(gen: Iterator[Any]) -> AsyncIterator[Any]:
    """Drive a sync iterator from a worker thread, one item per hop.

    The event loop never runs the iterator's code, so a blocking generator
    cannot stall other requests. Closing the async iterator closes the sync
    one (its ``finally`` runs) in a thread too.
    """
    try:
        while True:
            item = await anyio.to_thread.run_sync(in_thread, next, gen, _DONE)
            if item is _DONE:
                return
            yield item
    finally:
        close = getattr(gen, "close", None)
        if close is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(in_thread, close)


def as_stream(value: Any) -> AsyncIterator[Any] | None:
    """``value`` as an async iterator if it is a generator or iterator, else None."""
    if isinstance(value, (dict, str, bytes, list, tuple, int, float, type(None))):
        return None
    if hasattr(value, "__anext__"):
        return value  # type: ignore[no-any-return]
    if isinstance(value, Iterator):
        return iterate_in_thread(value)
    return None


class _Resume:
    """Await the rest of a coroutine that already ran up to its first suspension.

    Delegates exactly as ``await`` would (PEP 380): values the event loop
    sends and exceptions it throws (cancellation) go to the coroutine.
    """

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self.coro = coro
        self.first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, value = self.coro, self.first
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


def start_eagerly(coro: Coroutine[Any, Any, Any]) -> tuple[bool, Any]:
    """Run ``coro`` until it first suspends (Python 3.12's eager tasks, by hand).

    Returns ``(True, result)`` when it finished without suspending -- the
    common case for a quick agent, which then needs no cancel scope or timer --
    else ``(False, awaitable)`` for the caller to await under its deadline.
    Exceptions the coroutine raises propagate.
    """
    try:
        first = coro.send(None)
    except StopIteration as stop:
        return True, stop.value
    return False, _Resume(coro, first)


class Entrypoint:
    """The agent's entrypoint, callable as ``await ep(payload, context)``.

    Accepts ``f(request)`` or ``f(request, context)``; sync functions run in a
    worker thread; a generator (sync or async) comes back as an async
    iterator for the caller to stream.
    """

    __slots__ = ("__call__", "eager", "func", "is_streaming", "name", "wants_context")

    def __init__(self, func: Callable[..., Any]) -> None:
        if not callable(func):
            raise TypeError(f"entrypoint must be callable, got {func!r}")
        target = _unwrap(func)
        arity = _positional_arity(func)
        if arity < 1:
            raise TypeError(
                f"entrypoint {getattr(func, '__name__', func)!r} must accept the request: "
                "def agent(request) or def agent(request, context)"
            )
        self.func = func
        self.name: str = getattr(func, "__name__", type(func).__name__)
        self.wants_context = arity >= 2
        self.is_streaming = inspect.isasyncgenfunction(target) or inspect.isgeneratorfunction(
            target
        )
        self.eager = False  # a coroutine function: may be started eagerly
        if inspect.isasyncgenfunction(target) or inspect.isgeneratorfunction(target):
            self.__call__ = self._call_generator
        elif inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
            getattr(target, "__call__", None)  # noqa: B004 - callable objects with async __call__
        ):
            self.__call__ = self._call_async
            self.eager = inspect.iscoroutinefunction(target)
        else:
            self.__call__ = self._call_sync

    async def _call_async(self, payload: Any, context: RequestContext) -> Any:
        if self.wants_context:
            result = await self.func(payload, context)
        else:
            result = await self.func(payload)
        return as_stream(result) or result

    def start(self, payload: Any, context: RequestContext) -> tuple[bool, Any]:
        """Eager start of a coroutine entrypoint: see :func:`start_eagerly`."""
        coro = self.func(payload, context) if self.wants_context else self.func(payload)
        done, value = start_eagerly(coro)
        if done:
            return True, as_stream(value) or value
        return False, _finish_async(value)

    async def _call_generator(self, payload: Any, context: RequestContext) -> Any:
        # Creating a generator object runs none of its code, so no thread hop.
        gen = self.func(payload, context) if self.wants_context else self.func(payload)
        return as_stream(gen)

    async def _call_sync(self, payload: Any, context: RequestContext) -> Any:
        call = (
            functools.partial(self.func, payload, context)
            if self.wants_context
            else functools.partial(self.func, payload)
        )
        # A thread cannot be cancelled: on timeout the caller gets its answer
        # at once and the thread's result is dropped when it finishes.
        result = await anyio.to_thread.run_sync(in_thread, call, abandon_on_cancel=True)
        return as_stream(result) or result


async def _finish_async(pending: Awaitable[Any]) -> Any:
    result = await pending
    return as_stream(result) or result


def _as_async(func: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    target = _unwrap(func)
    if inspect.iscoroutinefunction(target):
        return func

    async def run_in_thread(*args: Any) -> Any:
        return await anyio.to_thread.run_sync(in_thread, func, *args)

    return run_in_thread


class Middleware:
    """A registered middleware, in one of two forms.

    * ``async def mw(context, request)`` runs before the entrypoint. It may
      raise (a :class:`PPIOAgentRuntimeError` keeps its status, anything else
      is a 500), return ``None`` to go on, or return a replacement request
      (an :class:`InvocationRequest` or a dict).
    * ``async def mw(context, request, call_next)`` wraps the rest of the
      chain: ``result = await call_next(request)``. For a streaming agent,
      ``result`` is the async iterator of chunks, which the middleware may
      wrap or return as is.
    """

    __slots__ = ("func", "name", "wraps")

    def __init__(self, func: Callable[..., Any]) -> None:
        arity = _positional_arity(func)
        if arity not in (2, 3) and arity != 99:
            raise TypeError(
                f"middleware {getattr(func, '__name__', func)!r} must take (context, request) "
                "or (context, request, call_next)"
            )
        self.name: str = getattr(func, "__name__", type(func).__name__)
        self.wraps = arity == 3
        self.func = _as_async(func)


def _coerce_request(value: Any, name: str) -> InvocationRequest:
    if isinstance(value, InvocationRequest):
        return value
    if isinstance(value, dict):
        return InvocationRequest.from_dict(value)
    raise TypeError(
        f"middleware {name!r} returned {type(value).__name__}; "
        "return None, an InvocationRequest or a dict"
    )


def build_chain(
    middlewares: list[Middleware],
    entrypoint: Entrypoint,
    context: RequestContext,
    original: dict[str, Any],
) -> NextHandler:
    """The middleware chain for one request, outermost first, ending in the entrypoint."""

    async def terminal(request: InvocationRequest) -> Any:
        return await entrypoint(request.to_dict(like=original), context)

    handler: NextHandler = terminal
    for mw in reversed(middlewares):
        handler = _link(mw, handler, context)
    return handler


def _link(mw: Middleware, call_next: NextHandler, context: RequestContext) -> NextHandler:
    if mw.wraps:

        async def around(request: InvocationRequest) -> Any:
            async def next_(req: Any = request) -> Any:
                return await call_next(_coerce_request(req, mw.name))

            return await mw.func(context, request, next_)

        return around

    async def before(request: InvocationRequest) -> Any:
        replacement = await mw.func(context, request)
        if replacement is not None:
            request = _coerce_request(replacement, mw.name)
        return await call_next(request)

    return before
