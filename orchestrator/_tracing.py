"""OpenTelemetry tracing of requests and turns, when ``opentelemetry-api`` is installed.

``pip install 'ppio-agent-runtime[otel]'`` installs the API and the SDK. Spans:

- one ``SERVER`` span per ``/v1`` request at the front door, named
  ``{method} {route}`` (``POST /v1/sessions/{session_id}/invocations``), a child of
  the trace context the request carries (``traceparent``, W3C; whatever the
  global propagator reads);
- one ``INTERNAL`` span per turn, ``turn {template}``, a child of the request
  that submitted it. A turn queued behind others runs in its session's actor
  task, not the request's: :func:`wait_for` (called while the request waits
  for its turn to start) leaves the request's context where the actor finds
  it (:func:`TurnSpan.open`).

The agent sees the turn span's context as ``RequestContext.traceparent``: an
in-process agent through :class:`~.sandbox.base.TurnCall` (and the span is the
current one while its entrypoint is called), a process sandbox's as the
``traceparent`` header of its ``/invocations`` request.

Spans go to the global ``TracerProvider`` the application sets up (the SDK
with an exporter, e.g. under ``opentelemetry-instrument``), or to the one
given to :func:`configure`. With the API alone nothing is recorded, and the
caller's context still reaches the agent.

Without ``opentelemetry``, :data:`ENABLED` is False: nothing is imported, and
the front door and the actor pay one boolean check per request and turn. With
the API but no SDK provider (nothing would be recorded), a request that carries
no ``traceparent`` is not traced either (:func:`wanted`): its spans would be
invalid and the agent's ``traceparent`` None anyway, at about 20 µs a request.
"""

from __future__ import annotations

import importlib.util
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from contextvars import Token

    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer, TracerProvider

__all__ = [
    "ENABLED",
    "TurnSpan",
    "configure",
    "end_request",
    "format_traceparent",
    "recording",
    "start_request",
    "turn_wanted",
    "wait_for",
    "wanted",
]


def _installed() -> bool:
    try:
        return importlib.util.find_spec("opentelemetry.trace") is not None
    except ImportError:  # no "opentelemetry" package at all
        return False


ENABLED: bool = _installed()
"""Whether ``opentelemetry-api`` can be imported (it is, on first use)."""

NAME = "ppio_sandbox.orchestrator"
_tracer: Tracer | None = None
_getter: Any = None
# The opentelemetry modules, bound once (an import statement per call costs a microsecond).
_context: Any = None
_propagate: Any = None
_trace: Any = None
RECHECK = 1.0
"""Seconds between looks for a global provider set by the application."""
_next_check = 0.0
_recording = False
"""Spans go to a real provider (given to :func:`configure`, or the global one once set)."""
_waiting: dict[Any, Context] = {}
"""Turns not started yet -> the context of the request waiting for them (see :func:`wait_for`)."""


def configure(provider: TracerProvider | None = None) -> None:
    """Use ``provider``'s tracer from now on (None: the global provider's, the default)."""
    global _tracer, _getter, _context, _propagate, _trace, _recording, _next_check
    from opentelemetry import context, propagate, trace
    from opentelemetry.propagators.textmap import Getter

    class AsgiGetter(Getter[list[tuple[bytes, bytes]]]):
        """Reads ASGI's raw header pairs."""

        def get(self, carrier: list[tuple[bytes, bytes]], key: str) -> list[str] | None:
            name = key.lower().encode("latin-1")
            found = [v.decode("latin-1") for n, v in carrier if n == name]
            return found or None

        def keys(self, carrier: list[tuple[bytes, bytes]]) -> list[str]:
            return [n.decode("latin-1") for n, _ in carrier]

    _context, _propagate, _trace = context, propagate, trace
    _getter = AsgiGetter()
    _tracer = trace.get_tracer(NAME, tracer_provider=provider)
    _recording = provider is not None and not isinstance(provider, trace.NoOpTracerProvider)
    _next_check = 0.0


def recording() -> bool:
    """Whether spans reach a provider that may record them: one given to
    :func:`configure`, or a global one set by the application (the API's own
    proxy and no-op providers record nothing; one set while serving is seen
    within :data:`RECHECK` seconds). Once true, true for good."""
    global _recording, _next_check
    if _recording:
        return True
    now = time.monotonic()
    if now < _next_check:
        return False
    _next_check = now + RECHECK  # the API reads os.environ on every look
    if _trace is None:
        configure()
    provider = _trace.get_tracer_provider()
    _recording = not isinstance(provider, (_trace.ProxyTracerProvider, _trace.NoOpTracerProvider))
    return _recording


def wanted(scope: dict[str, Any]) -> bool:
    """Whether to trace this request: spans are recorded, or it carries a trace
    context (``traceparent``) that its turn must hand on to the agent."""
    if _recording or recording():
        return True
    return any(name == b"traceparent" for name, _ in scope["headers"])


def turn_wanted(turn: Any, *, inline: bool) -> bool:
    """Whether ``turn`` gets a span (:meth:`TurnSpan.open`): spans are recorded, or
    the request it runs for was traced (its context current ``inline``, else left
    by :func:`wait_for`)."""
    if _recording or recording():
        return True
    return traced_context() if inline else turn in _waiting


def traced_context() -> bool:
    """Whether the current context holds a valid span (a traced request's)."""
    return bool(_trace.get_current_span().get_span_context().is_valid)


def _get_tracer() -> Tracer:
    if _tracer is None:
        configure()
    assert _tracer is not None
    return _tracer


def format_traceparent(span: Span) -> str | None:
    """The W3C ``traceparent`` of ``span``'s context; None when it has none."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"


def route_of(path: str) -> str:
    """``path`` with its ids replaced by names: a low-cardinality span name."""
    parts = path.split("/")  # ['', 'v1', kind, id, ...]
    if len(parts) > 3 and parts[1] == "v1" and parts[3]:
        name = {"sessions": "{session_id}", "agents": "{template_id}", "templates": "{template_id}"}
        if parts[2] in name:
            parts[3] = name[parts[2]]
    return "/".join(parts)


def start_request(scope: dict[str, Any]) -> tuple[Span, Token[Context]]:
    """A request's span, its parent read from the headers, made current; and the token
    :func:`end_request` needs."""
    tracer = _get_tracer()
    trace = _trace
    parent = _propagate.extract(scope["headers"], getter=_getter)
    method = scope["method"]
    route = route_of(scope["path"])
    span = tracer.start_span(
        f"{method} {route}",
        context=parent,
        kind=trace.SpanKind.SERVER,
        attributes={
            "http.request.method": method,
            "http.route": route,
            "url.path": scope["path"],
        },
    )
    return span, _context.attach(trace.set_span_in_context(span, parent))


def end_request(
    span: Span, token: Token[Context], status: int, session_id: str | None, request_id: str | None
) -> None:
    """End a request's span with what its reply said; the previous context is current again."""
    _context.detach(token)
    span.set_attribute("http.response.status_code", status)
    if session_id:
        span.set_attribute("ppio.session_id", session_id)
    if request_id:
        span.set_attribute("ppio.request_id", request_id)
    if status >= 500:
        span.set_status(_trace.Status(_trace.StatusCode.ERROR))
    span.end()


def wait_for(turn: Any) -> Context | None:
    """Note the current context as the parent of ``turn`` (not started yet) for the
    actor that will run it; the caller passes the result to :func:`done_waiting`."""
    if turn in _waiting:
        return None  # another request (a replay) waits for it too: the first one's
    if _context is None:
        configure()
    if not (_recording or recording() or traced_context()):
        return None  # nothing to hand on
    ctx: Context = _context.get_current()
    _waiting[turn] = ctx
    return ctx


def done_waiting(turn: Any, ctx: Context | None) -> None:
    """Drop what :func:`wait_for` left (unless the turn's actor already took it)."""
    if ctx is not None and _waiting.get(turn) is ctx:
        del _waiting[turn]


class TurnSpan:
    """A turn's span: its ``traceparent`` for the agent, ended once with the outcome."""

    __slots__ = ("_ended", "span", "traceparent")

    def __init__(self, span: Span) -> None:
        self.span = span
        self.traceparent = format_traceparent(span)
        self._ended = False

    @classmethod
    def open(cls, turn: Any, *, session_id: str, template_id: str, inline: bool) -> TurnSpan:
        """The span of ``turn``, child of the request that submitted it: the current
        context when it runs ``inline`` (in the request's task), else the one
        :func:`wait_for` left (a new trace when the request has gone)."""
        tracer = _get_tracer()
        parent = _context.get_current() if inline else _waiting.pop(turn, None)
        if parent is None:
            parent = _context.Context()  # the actor's own context is no request's
        span = tracer.start_span(
            f"turn {template_id}",
            context=parent,
            attributes={
                "ppio.session_id": session_id,
                "ppio.template_id": template_id,
                "ppio.request_id": turn.request_id,
                "ppio.idempotency_key": turn.key,
            },
        )
        return cls(span)

    def activate(self) -> Token[Context]:
        """Make the span current (for an in-process agent); pass the token to :meth:`deactivate`."""
        token: Token[Context] = _context.attach(_trace.set_span_in_context(self.span))
        return token

    @staticmethod
    def deactivate(token: Token[Context]) -> None:
        _context.detach(token)

    def end(self, outcome: str, error: BaseException | None = None) -> None:
        """End the span (once) with the turn's outcome."""
        if self._ended:
            return
        self._ended = True
        span = self.span
        span.set_attribute("ppio.turn.outcome", outcome)
        if outcome != "ok":
            description = str(error) if error is not None else outcome
            span.set_status(_trace.Status(_trace.StatusCode.ERROR, description))
            if error is not None:
                span.set_attribute("error.type", type(error).__name__)
        span.end()
