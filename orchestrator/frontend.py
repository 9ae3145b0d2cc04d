"""The front door: one ASGI application in front of everything.

It answers ``/ping``, ``/healthz`` and ``/metrics`` itself, serves the web
console's static files under ``/ui`` (``/`` redirects a browser there; the
files hold no data, which the page fetches from ``/v1`` with the user's
key), reads and bounds every ``/v1`` body, authenticates it (Bearer or HMAC, which needs the body),
sends invocations to the lean hot path and everything else to the Quart API
(with the body replayed and the tenant in the scope).

Every ``/v1`` request is logged once it is answered, at INFO on
``ppio_sandbox.orchestrator.access`` (method, path, status, session and request
ids, duration), and traced when OpenTelemetry is installed (:mod:`._tracing`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import anyio

from ppio_sandbox.agent_runtime._handlers import is_cancellation
from ppio_sandbox.agent_runtime.errors import (
    MethodNotAllowedError,
    NotFoundError,
    PPIOAgentRuntimeError,
    RequestTooLargeError,
    ValidationError,
)

from . import _tracing
from ._hypercorn import BODY_TIMEOUT_KEY
from .auth import Authenticator, Principal
from .host import Orchestrator
from .hotpath import InvocationHandler
from .metrics import CONTENT_TYPE, INCARNATION_HEADER
from .routing import Router
from .wire import encode_reply

__all__ = ["FrontDoor"]

logger = logging.getLogger("ppio_sandbox.orchestrator")
access_logger = logging.getLogger("ppio_sandbox.orchestrator.access")

_OPEN_PATHS = ("/ping", "/healthz")

CONSOLE_PATH = "/ui"
"""The web console's static files (``orchestrator/console/``); open like ``_OPEN_PATHS``."""
_CONSOLE_DIR = Path(__file__).parent / "console"
_CONSOLE_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
}
_CONSOLE_HEADERS = [
    (b"cache-control", b"no-cache"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
]

_DRAIN_BYTES = 16 * 1024 * 1024
_DRAIN_SECONDS = 5.0
"""An over-limit body is read and dropped, up to this many more bytes and seconds,
before its 413 is sent: see :func:`_drain`."""


class RequestTimeoutError(ValidationError):
    """408: the request's body did not arrive within the server's ``body_timeout``."""

    status_code = 408


def _route_label(path: str) -> str:
    """A low-cardinality route name for metrics (never an id)."""
    if path.startswith("/v1/"):
        if path.endswith("/invocations"):
            return "invocations"
        resource = path[4:].split("/", 1)[0]
        return resource if resource in ("sessions", "templates") else "other"
    if path in _OPEN_PATHS or path == "/metrics":
        return path[1:]
    if path == CONSOLE_PATH or path.startswith(CONSOLE_PATH + "/"):
        return "ui"
    return "other"


@functools.cache
def _console_files() -> dict[str, tuple[bytes, bytes, bytes]]:
    """The console's files by name: ``(body, content type, etag)``, read once."""
    files = {}
    for path in sorted(_CONSOLE_DIR.iterdir()):
        ctype = _CONSOLE_TYPES.get(path.suffix)
        if ctype is not None and path.is_file():
            body = path.read_bytes()
            etag = b'"%s"' % hashlib.sha256(body).hexdigest()[:20].encode()
            files[path.name] = (body, ctype, etag)
    return files


class _Reply(Exception):
    def __init__(self, error: PPIOAgentRuntimeError) -> None:
        self.error = error


class FrontDoor:
    """ASGI application of the orchestrator."""

    def __init__(
        self,
        host: Orchestrator,
        api: Any,
        authenticator: Authenticator,
        *,
        metrics: Any = None,
        max_request_size: int = 8 * 1024 * 1024,
        max_upload_size: int = 64 * 1024 * 1024,
        router: Router | None = None,
        tracing: bool | None = None,
    ) -> None:
        self.host = host
        self.router = router
        self.api = api
        self.auth = authenticator
        self.metrics = metrics
        self.max_request_size = max_request_size
        self.max_upload_size = max_upload_size
        self.invocations = InvocationHandler(host, self.send_error)
        # A span per request when OpenTelemetry is installed (None: it decides).
        self.tracing = _tracing.ENABLED and tracing is not False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.api(scope, receive, send)  # lifespan, websocket: Quart's business
            return
        path: str = scope["path"]
        if self.metrics is not None:
            send = self._counting(send, _route_label(path))
        if path.startswith("/v1/"):
            if self.tracing or access_logger.isEnabledFor(logging.INFO):
                await self._observed(scope, receive, send, path)
            else:
                await self._v1(scope, receive, send, path)
        elif path in _OPEN_PATHS:
            await self._health(scope, send)
        elif path == "/metrics":
            await self._metrics(scope, send)
        elif path == CONSOLE_PATH or path.startswith(CONSOLE_PATH + "/"):
            await self._console(scope, send, path)
        elif path == "/" and any(
            name == b"accept" and b"text/html" in value for name, value in scope["headers"]
        ):
            await send(
                {
                    "type": "http.response.start",
                    "status": 302,
                    "headers": [
                        (b"location", CONSOLE_PATH.encode()),
                        (b"vary", b"accept"),
                        (b"content-length", b"0"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": b""})
        else:
            await self.send_error(send, NotFoundError(f"no route {path}"), None, b"")

    async def _console(self, scope: dict[str, Any], send: Any, path: str) -> None:
        """A console file (``/ui`` is its page), with ETag revalidation; GET and HEAD only."""
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            error = MethodNotAllowedError(f"{method} not allowed on {path}")
            await self.send_error(send, error, None, b"", [(b"allow", b"GET, HEAD")])
            return
        found = _console_files().get(path[len(CONSOLE_PATH) :].lstrip("/") or "index.html")
        if found is None:
            await self.send_error(send, NotFoundError(f"no route {path}"), None, b"")
            return
        body, ctype, etag = found
        headers = [(b"content-type", ctype), (b"etag", etag), *_CONSOLE_HEADERS]
        if any(name == b"if-none-match" and etag in value for name, value in scope["headers"]):
            await send({"type": "http.response.start", "status": 304, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        headers.append((b"content-length", b"%d" % len(body)))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})

    def _counting(self, send: Any, route: str) -> Any:
        """``send`` that counts the reply in ``ppio_http_requests_total{route,status}``."""
        counter = self.metrics.http_requests_total

        async def counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                counter.labels(route, message["status"]).inc()
            await send(message)

        return counted

    async def _observed(self, scope: dict[str, Any], receive: Any, send: Any, path: str) -> None:
        """:meth:`_v1` in the request's span (traced), then its access log line."""
        traced = self.tracing and _tracing.wanted(scope)
        if not traced and not access_logger.isEnabledFor(logging.INFO):
            await self._v1(scope, receive, send, path)  # nothing to observe
            return
        started = time.perf_counter()
        status = 0
        session_id = request_id = None

        async def watched(message: dict[str, Any]) -> None:
            nonlocal status, session_id, request_id
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message["headers"]:
                    if name == b"x-ppio-session-id":
                        session_id = value.decode("latin-1")
                    elif name == b"x-ppio-request-id":
                        request_id = value.decode("latin-1")
            await send(message)

        span = token = None
        if traced:
            span, token = _tracing.start_request(scope)
        try:
            await self._v1(scope, receive, watched, path)
        except BaseException as exc:
            if not status:  # 499: the client left first (nginx's code); 500: the server's
                status = 499 if is_cancellation(exc) else 500
            raise
        finally:
            if request_id is None:
                request_id = next(
                    (v.decode("latin-1") for n, v in scope["headers"] if n == b"x-ppio-request-id"),
                    None,
                )
            if session_id is None and path.startswith("/v1/sessions/"):
                session_id = path.split("/", 4)[3] or None
            if span is not None and token is not None:
                _tracing.end_request(span, token, status, session_id, request_id)
            if access_logger.isEnabledFor(logging.INFO):
                millis = round((time.perf_counter() - started) * 1000, 3)
                access_logger.info(
                    "%s %s %d %.1fms",
                    scope["method"],
                    path,
                    status,
                    millis,
                    extra={
                        "method": scope["method"],
                        "path": path,
                        "status": status,
                        "session_id": session_id,
                        "request_id": request_id,
                        "duration_ms": millis,
                    },
                )

    async def _v1(self, scope: dict[str, Any], receive: Any, send: Any, path: str) -> None:
        method = scope["method"]
        upload = method == "POST" and path == "/v1/templates"
        router = self.router
        try:
            body = await self._read_body(
                scope, receive, self.max_upload_size if upload else self.max_request_size
            )
            # A request another node forwarded carries the tenant it authenticated.
            tenant = router.forwarder.is_internal(scope["headers"]) if router else None
            internal = tenant is not None
            if tenant is None:
                tenant = self.auth.authenticate(
                    method,
                    scope.get("raw_path") or path,
                    scope["query_string"],
                    scope["headers"],
                    body,
                ).tenant
        except _Reply as reply:
            await self.send_error(send, reply.error, None, b"", close=True)
            return
        except PPIOAgentRuntimeError as exc:
            await self.send_error(send, exc, None, b"")
            return
        if router is not None and await router.route(
            scope,
            receive,
            send,
            body=body,
            tenant=tenant,
            internal=internal,
            error_reply=self.send_error,
        ):
            return
        principal = Principal(tenant, None)
        if method == "POST" and path.endswith("/invocations"):
            parts = path.split("/")  # ['', 'v1', kind, target, 'invocations']
            if len(parts) == 5 and parts[2] in ("sessions", "agents") and parts[3]:
                await self.invocations(
                    scope,
                    receive,
                    send,
                    tenant=principal.tenant,
                    kind=parts[2],
                    target=parts[3],
                    body=body,
                )
                return
        scope = {**scope, "ppio.tenant": principal.tenant}
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # type: ignore[no-any-return]

        await self.api(scope, replay, send)

    async def _read_body(self, scope: dict[str, Any], receive: Any, limit: int) -> bytes:
        """The whole body, at most ``limit`` bytes; a 413, 408 or 400 ``_Reply`` otherwise.

        The server bounds the time (``body_timeout``, see :mod:`._hypercorn`): an
        overdue body ends in a disconnect message that says so, answered 408.
        """
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise _Reply(ValidationError("invalid Content-Length")) from None
                if declared > limit:
                    await _drain(receive)
                    raise _Reply(RequestTooLargeError(f"body exceeds {limit} bytes"))
                break
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                seconds = message.get(BODY_TIMEOUT_KEY)
                if seconds is not None:
                    raise _Reply(
                        RequestTimeoutError(f"the request body did not arrive within {seconds:g} s")
                    )
                raise _Reply(ValidationError("client disconnected while sending the body"))
            part = message.get("body", b"")
            size += len(part)
            if size > limit:
                if message.get("more_body", False):
                    await _drain(receive)
                raise _Reply(RequestTooLargeError(f"body exceeds {limit} bytes"))
            chunks.append(part)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _health(self, scope: dict[str, Any], send: Any) -> None:
        host = self.host
        status = "Healthy" if host.accepting else "ShuttingDown"
        value = {
            "status": status,
            "sessions": len(host.directory),
            "running_turns": host.running_turns,
        }
        body, ctype = encode_reply(value, b"")
        await send(
            {
                "type": "http.response.start",
                "status": 200 if host.accepting else 503,
                "headers": [(b"content-type", ctype), (b"content-length", b"%d" % len(body))],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _metrics(self, scope: dict[str, Any], send: Any) -> None:
        client = scope.get("client")
        host_addr = client[0] if client else None
        loopback = (
            host_addr is None
            or host_addr in ("::1", "localhost")
            or (isinstance(host_addr, str) and host_addr.startswith("127."))
        )
        if not loopback or self.metrics is None:
            await self.send_error(send, NotFoundError("no route /metrics"), None, b"")
            return
        body = self.metrics.render()
        if self.router is not None and b"local=1" not in scope.get("query_string", b""):
            body = await self.router.machine_metrics(body)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", CONTENT_TYPE.encode()),
                    (b"content-length", b"%d" % len(body)),
                    (INCARNATION_HEADER.encode(), self.metrics.incarnation.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def send_error(
        self,
        send: Any,
        error: PPIOAgentRuntimeError,
        request_id: str | None,
        accept: bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
        *,
        close: bool = False,
    ) -> None:
        body, ctype = encode_reply(error.to_envelope(request_id), accept)
        out = [*(headers or ()), (b"content-type", ctype), (b"content-length", b"%d" % len(body))]
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            out.append((b"retry-after", b"%d" % max(1, round(retry_after))))
        if close:
            out.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": error.status_code, "headers": out})
        await send({"type": "http.response.body", "body": body})


async def _drain(receive: Any) -> None:
    """Read and drop the rest of an over-limit body, so the client can read its 413.

    hypercorn closes a connection as soon as a reply is sent before its
    request's body was read, and closing a socket with unread data makes the
    kernel reset the connection: a client still sending (chunked, or a
    ``Content-Length`` over the limit) got a reset instead of the 413, which
    the reset discards. Reading the body to its end first lets the client
    finish writing and read the reply. The drain is bounded: at most
    ``_DRAIN_BYTES`` and ``_DRAIN_SECONDS``, then the 413 goes out anyway.
    """
    dropped = 0
    with anyio.move_on_after(_DRAIN_SECONDS):
        while dropped <= _DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            dropped += len(message.get("body", b""))
            if not message.get("more_body", False):
                return
