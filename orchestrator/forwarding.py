"""Forwarding a request to the node that owns its session.

Any node accepts any request; one for a session another node owns goes
there over a pooled keep-alive connection (the Unix socket of a worker on
the same machine, HTTP to another machine) and its reply, streams included,
comes back chunk by chunk. The reply names the owner (``X-PPIO-Owner``, and
``X-PPIO-Owner-URL`` when it has one) so a client can go there directly
next time.

Trust between nodes: the forwarding node has authenticated the caller; it
sends the tenant in ``X-PPIO-Tenant`` with the cluster's shared token in
``X-PPIO-Internal``, and the owner takes the tenant from there instead of
authenticating again (the caller's signature and nonce are not replayed).
The token never leaves the cluster: it is checked in constant time, and a
request from outside that carries one is refused like any bad credential.

Failures: an owner that cannot be reached at all gives a retryable 503 with
``Retry-After`` (it is being restarted, or its lease is running out and
another node will take its sessions over); an owner lost after the request
went out gives a 502, as a crashed sandbox would (the turn may have run:
its retry with the same ``Idempotency-Key`` replays or runs it again).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import anyio.lowlevel
import httpx

from ppio_sandbox.agent_runtime.errors import (
    PPIOAgentRuntimeError,
    SandboxCrashedError,
    ServiceUnavailableError,
)

from .placement import Owner

__all__ = [
    "HEADER_FORWARDED_BY",
    "HEADER_INTERNAL",
    "HEADER_OWNER",
    "HEADER_OWNER_URL",
    "HEADER_TENANT",
    "MISDIRECTED",
    "Forwarder",
    "Misdirected",
]

logger = logging.getLogger("ppio_sandbox.orchestrator.forwarding")

HEADER_INTERNAL = "x-ppio-internal"
HEADER_TENANT = "x-ppio-tenant"
HEADER_FORWARDED_BY = "x-ppio-forwarded-by"
HEADER_OWNER = "x-ppio-owner"
HEADER_OWNER_URL = "x-ppio-owner-url"
MISDIRECTED = 421
"""What an owner answers for a session it no longer has: the sender retries once."""

_DROPPED = frozenset(
    {
        b"authorization",
        b"connection",
        b"content-length",
        b"host",
        b"keep-alive",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"x-ppio-date",
        b"x-ppio-nonce",
        b"x-ppio-content-sha256",
        HEADER_INTERNAL.encode(),
        HEADER_TENANT.encode(),
        HEADER_FORWARDED_BY.encode(),
    }
)
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})
_NOT_RELAYED = _HOP_BY_HOP | {
    "date",  # this node's server adds its own Date and Server: one of each
    "server",
    HEADER_OWNER,  # set below; a reply relayed twice (another machine's worker) names it once
    HEADER_OWNER_URL,
}
_TIMEOUT = httpx.Timeout(connect=5.0, read=None, write=30.0, pool=10.0)
_LIMITS = httpx.Limits(max_connections=256, max_keepalive_connections=64, keepalive_expiry=60.0)


class Misdirected(Exception):
    """The node asked no longer owns the session."""


class Forwarder:
    """Pooled connections to the other nodes, and the proxying of one request."""

    def __init__(self, node_id: str, token: str, *, retry_after: float = 1.0) -> None:
        self.node_id = node_id
        self.token = token
        self.retry_after = retry_after
        self._clients: dict[str, httpx.AsyncClient] = {}
        self._token_bytes = token.encode()

    def is_internal(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """The tenant of a request another node forwarded (None if it is not one)."""
        token = tenant = None
        for name, value in headers:
            if name == b"x-ppio-internal":
                token = value
            elif name == b"x-ppio-tenant":
                tenant = value.decode("latin-1")
        if token is None:
            return None
        if tenant is None or not hmac.compare_digest(token, self._token_bytes):
            return None
        return tenant

    def _client(self, address: str) -> httpx.AsyncClient:
        client = self._clients.get(address)
        if client is None:
            if address.startswith("unix:"):
                transport = httpx.AsyncHTTPTransport(uds=address[5:], limits=_LIMITS)
                base = "http://node"
            else:
                transport = httpx.AsyncHTTPTransport(limits=_LIMITS)
                base = address
            client = httpx.AsyncClient(transport=transport, base_url=base, timeout=_TIMEOUT)
            self._clients[address] = client
        return client

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        with anyio.CancelScope(shield=True):
            for client in clients:
                await client.aclose()

    def _headers(self, scope: Mapping[str, Any], tenant: str) -> list[tuple[bytes, bytes]]:
        out = [(n, v) for n, v in scope["headers"] if n not in _DROPPED]
        out += [
            (HEADER_INTERNAL.encode(), self._token_bytes),
            (HEADER_TENANT.encode(), tenant.encode("latin-1")),
            (HEADER_FORWARDED_BY.encode(), self.node_id.encode("latin-1")),
        ]
        return out

    async def forward(
        self,
        scope: Mapping[str, Any],
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
        *,
        body: bytes,
        tenant: str,
        owner: Owner,
        owner_url: str | None = None,
    ) -> None:
        """Send the request to ``owner`` and its reply to ``send``.

        Raises :class:`Misdirected` (nothing sent yet) when the owner says it
        no longer has the session, and ServiceUnavailableError /
        SandboxCrashedError (nothing sent yet) when it cannot be reached.
        """
        assert owner.address is not None
        client = self._client(owner.address)
        path = scope.get("raw_path") or scope["path"].encode()
        url = path.decode("latin-1")
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        request = client.build_request(
            scope["method"], url, content=body, headers=self._headers(scope, tenant)
        )
        try:
            response = await client.send(request, stream=True)
        except httpx.ConnectError as exc:
            raise ServiceUnavailableError(
                f"node {owner.node}, which owns this session, cannot be reached ({exc}); "
                "it is restarting or another node is taking its sessions over: retry",
                retry_after=self.retry_after,
            ) from None
        except httpx.TransportError as exc:
            raise SandboxCrashedError(
                f"node {owner.node}, which owns this session, was lost during the request "
                f"({type(exc).__name__}); a retry with the same Idempotency-Key is safe"
            ) from None
        try:
            if response.status_code == MISDIRECTED:
                raise Misdirected(owner.node)
            headers = [
                (name.encode("latin-1"), value.encode("latin-1"))
                for name, value in response.headers.multi_items()
                if name.lower() not in _NOT_RELAYED
            ]
            headers.append((HEADER_OWNER.encode(), owner.node.encode("latin-1")))
            if owner_url:
                headers.append((HEADER_OWNER_URL.encode(), owner_url.encode("latin-1")))
            await self._relay(response, receive, send, headers)
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()

    async def _relay(
        self,
        response: httpx.Response,
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        started = False
        async with anyio.create_task_group() as tg:

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()  # the caller left: stop reading the owner's reply

            tg.start_soon(watch_disconnect)
            try:
                await send(
                    {
                        "type": "http.response.start",
                        "status": response.status_code,
                        "headers": headers,
                    }
                )
                started = True
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    await anyio.lowlevel.checkpoint()
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except httpx.TransportError as exc:
                # The owner died mid-reply: end the connection so the caller sees a
                # broken reply (a stream resumes with Last-Event-ID elsewhere).
                logger.warning("node lost mid-reply: %s", exc)
                if not started:
                    raise SandboxCrashedError("the node owning this session was lost") from None
                raise
            tg.cancel_scope.cancel()

    async def get_json(self, owner: Owner, path: str, tenant: str) -> Any:
        """A GET on another node, as this node (the fan-out of a listing); its JSON."""
        return (await self.get(owner, path, tenant)).json()

    async def get(self, owner: Owner, path: str, tenant: str) -> httpx.Response:
        """A GET on another node, as this node; its reply (200 only)."""
        assert owner.address is not None
        client = self._client(owner.address)
        headers = {
            HEADER_INTERNAL: self.token,
            HEADER_TENANT: tenant,
            HEADER_FORWARDED_BY: self.node_id,
        }
        try:
            response = await client.get(path, headers=headers)
        except httpx.TransportError as exc:
            raise ServiceUnavailableError(
                f"node {owner.node} cannot be reached ({exc})", retry_after=self.retry_after
            ) from None
        if response.status_code != 200:
            raise PPIOAgentRuntimeError(f"node {owner.node} answered {response.status_code}")
        return response
