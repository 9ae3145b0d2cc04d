"""One keep-alive HTTP connection pool to the orchestrator, and the rules of a call.

:class:`ApiConnection` owns the ``httpx.AsyncClient``. Every call it makes:

- carries an ``Idempotency-Key`` (one per logical call, the same on every retry);
- runs under a deadline (an anyio cancel scope), past which it raises
  :class:`InvocationTimeoutError` at once;
- is retried as :mod:`._retry` allows, within the client's one
  :class:`RetryBudget` (a reply that is not an event stream is read inside
  the attempt, so a connection lost while reading it is retried like one
  lost before the reply);
- turns the server's error envelope into the exception class the server
  named (:func:`error_from_envelope`), and a transport failure into a
  :class:`ServiceUnavailableError` ("cannot reach ...") or
  :class:`InvocationTimeoutError`, with the httpx exception chained;
- for a request about one session, goes straight to the session's owner
  node when a reply named it (``X-PPIO-Owner-URL``, see :mod:`._owners`;
  ``ClientConfig.direct_to_owner``). If the owner cannot be connected to,
  or answers 421 (it no longer owns the session) or 503, the owner is
  forgotten and the same request (same bytes, same ``Idempotency-Key``) goes
  at once to the configured base URL, which routes it to the current owner;
  that fallback is part of the same attempt (same deadline, no retry spent),
  and the rest of the call stays on the base URL;
- carries the caller's OpenTelemetry trace context (``traceparent``, and
  whatever else the global propagator writes) when the application uses
  OpenTelemetry: the orchestrator's spans and the agent's
  ``RequestContext.traceparent`` continue the caller's trace. Without it,
  nothing is imported and a call pays one dict lookup.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import anyio
import httpx

from ppio_sandbox.agent_runtime.errors import (
    InvocationTimeoutError,
    PPIOAgentRuntimeError,
    ServiceUnavailableError,
    TooManyRequestsError,
    error_from_envelope,
)
from ppio_sandbox.agent_runtime.protocol import (
    CONTENT_JSON,
    HEADER_IDEMPOTENCY_KEY,
    HEADER_LAST_EVENT_ID,
    HEADER_REQUEST_ID,
    encode_json,
)

from ._config import ClientConfig
from ._models import PreparedInvocation, decode_reply, new_key
from ._owners import OwnerRoutes, session_of
from ._retry import RetryBudget, RetryPolicy, RetryState, parse_retry_after

__all__ = ["ApiConnection", "decode_reply", "error_from_response", "is_event_stream"]

logger = logging.getLogger("ppio_sandbox.client")

_USER_AGENT = "ppio-sandbox-client/0.1"
_MISDIRECTED = 421  # the owner asked no longer owns the session
_OWNER_FALLBACK = frozenset({_MISDIRECTED, 503})


def _inject_trace_context(headers: dict[str, str]) -> None:
    """Add the current OpenTelemetry context's headers (``traceparent``...) to ``headers``."""
    from opentelemetry.propagate import inject

    inject(headers)


def is_event_stream(response: httpx.Response) -> bool:
    ctype: str = response.headers.get("content-type", "")
    return ctype.startswith("text/event-stream")


def error_from_response(response: httpx.Response) -> PPIOAgentRuntimeError:
    """The exception a (read) error response describes."""
    try:
        body = decode_reply(response)
    except Exception:  # not JSON: a proxy's HTML page, plain text...
        body = None
    if not isinstance(body, dict) or "error" not in body:
        text = response.text.strip()[:200] if response.content else response.reason_phrase
        body = {"error": f"HTTP {response.status_code} from {response.url.path}: {text}"}
    exc = error_from_envelope(response.status_code, body)
    if exc.request_id is None:
        exc.request_id = response.headers.get(HEADER_REQUEST_ID)
    if isinstance(exc, TooManyRequestsError):
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        if retry_after is not None:
            exc.retry_after = retry_after
    return exc


class ApiConnection:
    """The HTTP side of a client: a pooled ``httpx.AsyncClient`` plus call rules."""

    def __init__(
        self,
        config: ClientConfig,
        *,
        auth: httpx.Auth | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self.retry = RetryPolicy(
            max_retries=config.max_retries, base=config.retry_backoff, cap=config.retry_max_backoff
        )
        self.budget: RetryBudget | None = None
        if config.retry_budget_ratio is not None:
            self.budget = RetryBudget(
                config.retry_budget_ratio,
                config.retry_budget_min_tokens,
                config.retry_budget_max_tokens,
            )
        self._auth = auth
        self.http = self._http_client(config.base_url, transport)
        self.owners: OwnerRoutes | None = None
        if config.direct_to_owner:
            self.owners = OwnerRoutes(config.base_url, self._owner_client)

    def _http_client(
        self, base_url: str, transport: httpx.AsyncBaseTransport | None = None
    ) -> httpx.AsyncClient:
        # No httpx read/pool timeouts: each call's deadline is an anyio cancel scope.
        return httpx.AsyncClient(
            base_url=base_url,
            auth=self._auth,
            transport=transport,
            timeout=httpx.Timeout(None, connect=self.config.connect_timeout),
            limits=httpx.Limits(
                max_connections=self.config.max_connections,
                max_keepalive_connections=self.config.max_keepalive_connections,
            ),
            headers={"User-Agent": _USER_AGENT, **self.config.headers},
        )

    def _owner_client(self, url: str) -> httpx.AsyncClient:
        """A pool to an owner node: httpx's own transport, the base pool's auth and hooks."""
        client = self._http_client(url)
        client.event_hooks = self.http.event_hooks
        return client

    async def aclose(self) -> None:
        try:
            await self.http.aclose()
        finally:
            if self.owners is not None:
                await self.owners.aclose()

    def deadline(self, timeout: float | None) -> tuple[float, float]:
        """``(absolute deadline, seconds)`` for a call with this ``timeout``."""
        seconds = self.config.deadline_seconds(timeout)
        return anyio.current_time() + seconds, seconds

    # -- sending ------------------------------------------------------------

    def retry_state(self, *, idempotent: bool, deadline: float = math.inf) -> RetryState:
        """The retry state of one logical call (it spends from this client's budget)."""
        return RetryState(self.retry, self.budget, idempotent=idempotent, deadline=deadline)

    async def send(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        content_type: str | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        idempotent: bool,
        deadline: float = math.inf,
        retries: RetryState | None = None,
    ) -> httpx.Response:
        """Send with retries; the response has status < 400 and is read, or an open stream.

        An event stream is left open for the caller to read; any other reply
        is read in full before it is returned (the caller still closes it).
        An error status is raised as the server's exception; a transport
        error is translated. ``retries`` continues an earlier attempt's
        count (a resumed stream); by default the call starts its own.
        """
        all_headers = {HEADER_IDEMPOTENCY_KEY: new_key(), HEADER_REQUEST_ID: new_key()}
        all_headers.update(headers or {})
        if content_type is not None:
            all_headers["Content-Type"] = content_type
        # No span can be current before the application imported OpenTelemetry.
        if "opentelemetry.context" in sys.modules:
            _inject_trace_context(all_headers)
        about: tuple[OwnerRoutes, str] | None = None  # the session it is about, if any
        if self.owners is not None and (sid := session_of(path, all_headers)) is not None:
            about = (self.owners, sid)
        fell_back = False  # once the base URL had to stand in, the call stays there

        def build(http: httpx.AsyncClient) -> httpx.Request:
            # Built (and signed, by the client's auth) for the URL it goes to.
            return http.build_request(
                method, path, content=content, headers=all_headers, params=params
            )

        async def attempt() -> httpx.Response:
            nonlocal fell_back
            response = None
            if about is not None and not fell_back:
                owners, session = about
                url = owners.route(session)
                if url is not None:
                    response = await self._send_to_owner(owners, session, url, build)
                    fell_back = response is None
            if response is None:
                response = await self.http.send(build(self.http), stream=True)
            if about is not None:
                about[0].learn(about[1], response)
            if not is_event_stream(response):
                try:
                    await response.aread()
                finally:
                    await response.aclose()
            return response

        if retries is None:
            retries = self.retry_state(idempotent=idempotent, deadline=deadline)
        try:
            response = await retries.send(attempt)
        except httpx.TransportError as exc:
            self.raise_transport_error(exc)
        finally:
            if about is not None and method == "DELETE":
                about[0].forget(about[1])  # the session is closed (or was gone)
        if response.status_code >= 400:
            try:
                await response.aread()
            except httpx.TransportError as exc:
                self.raise_transport_error(exc)
            finally:
                await response.aclose()
            raise error_from_response(response)
        return response

    async def _send_to_owner(
        self,
        owners: OwnerRoutes,
        session: str,
        url: str,
        build: Callable[[httpx.AsyncClient], httpx.Request],
    ) -> httpx.Response | None:
        """Send to the session's owner; None when the base URL must stand in.

        That is when the owner cannot be connected to (it never saw the
        request), or answers 421 (it does not own the session any more) or
        503 (it cannot serve now): the owner is forgotten.
        """
        try:
            response = await owners.send(url, build)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            why = str(exc) or type(exc).__name__
        else:
            if response.status_code not in _OWNER_FALLBACK:
                return response
            await response.aclose()
            why = f"HTTP {response.status_code}"
        owners.forget(session, url)
        logger.debug(
            "owner %s of session %s: %s; going through %s instead",
            url,
            session,
            why,
            self.config.base_url,
        )
        return None

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        idempotent: bool | None = None,
        timeout: float | None = None,
        content: bytes | None = None,
        content_type: str | None = None,
    ) -> Any:
        """A management call: JSON ``body`` in, the decoded reply out, under a deadline."""
        if body is not None:
            content, content_type = encode_json(body), CONTENT_JSON
        deadline, seconds = self.deadline(timeout)
        if idempotent is None:
            idempotent = method in ("GET", "HEAD")
        with anyio.CancelScope(deadline=deadline):
            response = await self.send(
                method,
                path,
                content=content,
                content_type=content_type,
                idempotent=idempotent,
                deadline=deadline,
            )
            try:
                await response.aread()
            except httpx.TransportError as exc:
                self.raise_transport_error(exc)
            finally:
                await response.aclose()
            return decode_reply(response)
        raise InvocationTimeoutError(f"{method} {path}: no reply within {seconds:g} s")

    async def open_invocation(
        self,
        inv: PreparedInvocation,
        *,
        retries: RetryState | None = None,
        last_event_id: str | None = None,
    ) -> httpx.Response:
        """Send an invocation; the open response (JSON envelope or event stream).

        ``last_event_id`` resumes a broken stream after that event (the same
        body and ``Idempotency-Key``: the server replays or rejoins the turn).
        The caller holds the deadline's cancel scope.
        """
        headers = inv.headers
        if last_event_id is not None:
            headers = {**headers, HEADER_LAST_EVENT_ID: last_event_id}
        return await self.send(
            "POST",
            inv.path,
            content=inv.body,
            content_type=inv.content_type,
            headers=headers,
            params=inv.params,
            idempotent=True,  # the server deduplicates on the Idempotency-Key
            deadline=inv.deadline,
            retries=retries,
        )

    def raise_transport_error(self, exc: httpx.TransportError) -> NoReturn:
        """Raise the package's exception for an httpx transport failure."""
        where = self.config.base_url
        try:
            url = exc.request.url
        except RuntimeError:  # no request attached
            pass
        else:
            if not str(url).startswith(f"{where}/"):  # it went to a session's owner
                where = f"{url.scheme}://{url.netloc.decode('ascii')}"
        detail = str(exc) or type(exc).__name__
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            raise ServiceUnavailableError(f"cannot reach {where}: {detail}") from exc
        if isinstance(exc, httpx.TimeoutException):
            raise InvocationTimeoutError(f"{where} did not answer in time: {detail}") from exc
        raise ServiceUnavailableError(f"lost the connection to {where}: {detail}") from exc
