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
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.lowlevel

from ppio_sandbox.agent_runtime.errors import (
    PPIOAgentRuntimeError,
    SandboxCrashedError,
    ServiceUnavailableError,
)

from .placement import Owner
from .sandbox._h11client import ConnectError, H11Client, Response, TransportError

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
_NOT_RELAYED = frozenset(
    name.encode()
    for name in (
        "connection",
        "keep-alive",
        "transfer-encoding",
        "date",  # this node's server adds its own Date and Server: one of each
        "server",
        HEADER_OWNER,  # set below; a reply relayed twice (another machine's worker) names it once
        HEADER_OWNER_URL,
    )
)
MAX_IDLE = 64
"""Keep-alive connections kept open to each other node (more open while busy)."""


@dataclass(frozen=True)
class Reply:
    """A whole reply from another node (:meth:`Forwarder.get`)."""

    status: int
    headers: dict[str, str]
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)


class Misdirected(Exception):
    """The node asked no longer owns the session."""


class Forwarder:
    """Pooled connections to the other nodes, and the proxying of one request."""

    def __init__(self, node_id: str, token: str, *, retry_after: float = 1.0) -> None:
        self.node_id = node_id
        self.token = token
        self.retry_after = retry_after
        self._clients: dict[str, H11Client] = {}
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

    def _client(self, address: str) -> H11Client:
        """Pooled keep-alive connections to one node (h11 over anyio streams, no httpx)."""
        client = self._clients.get(address)
        if client is None:
            if address.startswith("unix:"):
                client = H11Client.unix(address[5:], connect_timeout=5.0)
            else:
                url = urlsplit(address)
                client = H11Client.tcp(url.hostname or "", url.port or 80, connect_timeout=5.0)
            client.max_idle = MAX_IDLE
            self._clients[address] = client
        return client

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        with anyio.CancelScope(shield=True):
            for client in clients:
                await client.aclose()

    def _headers(self, scope: Mapping[str, Any], tenant: str) -> list[tuple[str, str]]:
        out = [
            (n.decode("latin-1"), v.decode("latin-1"))
            for n, v in scope["headers"]
            if n not in _DROPPED
        ]
        out += [
            (HEADER_INTERNAL, self.token),
            (HEADER_TENANT, tenant),
            (HEADER_FORWARDED_BY, self.node_id),
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
        target = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        try:
            response = await client.send(
                scope["method"], target.decode("latin-1"), self._headers(scope, tenant), body
            )
        except ConnectError as exc:
            raise ServiceUnavailableError(
                f"node {owner.node}, which owns this session, cannot be reached ({exc}); "
                "it is restarting or another node is taking its sessions over: retry",
                retry_after=self.retry_after,
            ) from None
        except TransportError as exc:
            raise SandboxCrashedError(
                f"node {owner.node}, which owns this session, was lost during the request "
                f"({type(exc).__name__}); a retry with the same Idempotency-Key is safe"
            ) from None
        try:
            if response.status == MISDIRECTED:
                raise Misdirected(owner.node)
            headers = [(n, v) for n, v in response.headers if n not in _NOT_RELAYED]
            headers.append((HEADER_OWNER.encode(), owner.node.encode("latin-1")))
            if owner_url:
                headers.append((HEADER_OWNER_URL.encode(), owner_url.encode("latin-1")))
            await self._relay(response, receive, send, headers)
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()

    async def _relay(
        self,
        response: Response,
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        start = {"type": "http.response.start", "status": response.status, "headers": headers}
        if not response.header(b"content-type").startswith(b"text/event-stream"):
            # A plain reply: its body follows its head at once.
            try:
                body = await response.read()
            except TransportError:
                raise SandboxCrashedError("the node owning this session was lost") from None
            await send(start)
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        started = False
        async with anyio.create_task_group() as tg:

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()  # the caller left: stop reading the owner's stream

            tg.start_soon(watch_disconnect)
            try:
                await send(start)
                started = True
                while chunk := await response.receive():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    await anyio.lowlevel.checkpoint()
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except TransportError as exc:
                # The owner died mid-stream: end the connection so the caller sees a
                # broken reply (a stream resumes with Last-Event-ID elsewhere).
                logger.warning("node lost mid-reply: %s", exc)
                if not started:
                    raise SandboxCrashedError("the node owning this session was lost") from None
                raise
            tg.cancel_scope.cancel()

    async def get_json(self, owner: Owner, path: str, tenant: str) -> Any:
        """A GET on another node, as this node (the fan-out of a listing); its JSON."""
        return (await self.get(owner, path, tenant)).json()

    async def get(self, owner: Owner, path: str, tenant: str) -> Reply:
        """A GET on another node, as this node; its reply (200 only)."""
        assert owner.address is not None
        client = self._client(owner.address)
        headers = [
            (HEADER_INTERNAL, self.token),
            (HEADER_TENANT, tenant),
            (HEADER_FORWARDED_BY, self.node_id),
        ]
        try:
            response = await client.send("GET", path, headers)
            content = await response.read()
        except TransportError as exc:
            raise ServiceUnavailableError(
                f"node {owner.node} cannot be reached ({exc})", retry_after=self.retry_after
            ) from None
        if response.status != 200:
            raise PPIOAgentRuntimeError(f"node {owner.node} answered {response.status}")
        names = {n.decode("latin-1"): v.decode("latin-1") for n, v in response.headers}
        return Reply(response.status, names, content)
