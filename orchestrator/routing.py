"""Routing: serve a request here, or send it to the node owning its session.

Used by the front door when the node is one of several (``--workers``,
``--cluster``). A request that names a session -- in its path
(``/v1/sessions/{id}/...``), in ``X-PPIO-Session-Id`` on the AgentCore route,
or as ``session_id`` in the body of ``POST /v1/sessions`` -- runs on that
session's owner (:mod:`.placement`); everything else runs where it arrives.
``GET /v1/sessions`` asks every node and merges; ``GET /v1/cluster`` shows
the members.

The common case costs nothing: the owner is read from the session id or
from a watch-fed cache, never from an engine on the request path. A session
nobody owns (a new caller-named id, or one whose node died) is claimed by
the node the request reached, then brought back from its checkpoint there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from ppio_sandbox.agent_runtime.errors import (
    PPIOAgentRuntimeError,
    SandboxCrashedError,
    ServiceUnavailableError,
)

from .forwarding import HEADER_FORWARDED_BY, MISDIRECTED, Forwarder, Misdirected
from .host import Orchestrator
from .metrics import INCARNATION_HEADER, merge_expositions
from .placement import Member, Owner, Placement
from .wire import decode_object, encode_reply, record_view, session_view

__all__ = ["Router"]

logger = logging.getLogger("ppio_sandbox.orchestrator.routing")

OWNER_CHECK_INTERVAL = 0.25
"""Seconds between looks, while a forwarded request waits, at whether its owner still is."""

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class Router:
    """Decides where each ``/v1`` request runs. See the module docstring."""

    def __init__(self, host: Orchestrator, placement: Placement, forwarder: Forwarder) -> None:
        self.host = host
        self.placement = placement
        self.forwarder = forwarder
        self.wall_offset = time.time() - host.clock()

    # -- which session ------------------------------------------------------

    @staticmethod
    def session_of(
        method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> str | None:
        """The session id a request is about, if it names one."""
        parts = path.split("/")  # ['', 'v1', 'sessions', id, ...]
        if len(parts) >= 4 and parts[2] == "sessions" and parts[3]:
            return parts[3]
        if len(parts) == 5 and parts[2] == "agents" and parts[4] == "invocations":
            for name, value in headers:
                if name in (b"x-ppio-session-id", b"x-amzn-bedrock-agentcore-runtime-session-id"):
                    return value.decode("latin-1") or None
            return None
        if method == "POST" and path == "/v1/sessions" and body:
            ctype = next((v for n, v in headers if n == b"content-type"), b"")
            try:
                named: object = decode_object(ctype, body).get("session_id")
            except PPIOAgentRuntimeError:
                return None  # the API answers the 400
            return named if isinstance(named, str) and named else None
        return None

    # -- dispatch -----------------------------------------------------------

    async def route(
        self,
        scope: dict[str, Any],
        receive: Receive,
        send: Send,
        *,
        body: bytes,
        tenant: str,
        internal: bool,
        error_reply: Callable[..., Awaitable[None]],
    ) -> bool:
        """Handle the request if it is not this node's to serve; True when handled."""
        method, path = scope["method"], scope["path"]
        accept = next((v for n, v in scope["headers"] if n == b"accept"), b"")
        try:
            if path == "/v1/cluster" and method == "GET":
                await self._reply(send, await self.cluster_view(), accept)
                return True
            if path == "/v1/sessions" and method == "GET" and not internal:
                await self._reply(send, {"sessions": await self.list_sessions(tenant)}, accept)
                return True
            sid = self.session_of(method, path, scope["headers"], body)
            if sid is None:
                if method == "POST" and (path == "/v1/sessions" or path.endswith("/invocations")):
                    # A new session with a generated id is this node's: only while it may
                    # serve (a node that lost its lease would create what it cannot keep).
                    self.placement.check_serving()
                return False
            owner = self.placement.owner(tenant, sid)
            if owner is None:
                # Nobody owns it, as far as this node knows: claim it here. So too for a
                # request another node sent, which may have seen this node's own claim
                # (made for a request racing this one) before this node did.
                owner = await self.placement.claim(tenant, sid)
            if owner.local:
                self.placement.check_serving()
                return False
            if internal and not self._from_another_machine(scope, owner):
                return await self._misdirected(send)  # the sender thought we own it: we do not
            await self._forward(scope, receive, send, body, tenant, sid, owner)
        except PPIOAgentRuntimeError as exc:
            await error_reply(send, exc, None, accept)
        return True

    async def _forward(
        self,
        scope: dict[str, Any],
        receive: Receive,
        send: Send,
        body: bytes,
        tenant: str,
        sid: str,
        owner: Owner,
    ) -> None:
        metrics = self.host.metrics
        for attempt in (1, 2):
            if owner.address is None:  # its node is leaving, or not in view yet
                raise ServiceUnavailableError(
                    f"node {owner.node}, which owns session {sid}, cannot be reached; "
                    "its sessions move to another node shortly",
                    retry_after=self.placement.retry_after,
                )
            try:
                if self.placement.ownership_moves:
                    await self._forward_watched(scope, receive, send, body, tenant, sid, owner)
                else:  # a fixed set of workers: the owner cannot change under the request
                    await self.forwarder.forward(
                        scope,
                        receive,
                        send,
                        body=body,
                        tenant=tenant,
                        owner=owner,
                        owner_url=self._url_of(owner),
                    )
            except Misdirected:
                if metrics is not None:
                    metrics.forwarded_total.labels("misdirected").inc()
                if attempt == 2:
                    raise ServiceUnavailableError(
                        f"session {sid} is moving between nodes; retry", retry_after=1.0
                    ) from None
                await anyio.sleep(0.05)  # let the caches catch up, then look again
                self.placement.forget(tenant, sid)
                found = self.placement.owner(tenant, sid)
                if found is None:
                    found = await self.placement.claim(tenant, sid)
                if found.local:
                    raise ServiceUnavailableError(
                        f"session {sid} has just moved here; retry", retry_after=0.1
                    ) from None
                owner = found
                continue
            except PPIOAgentRuntimeError:
                if metrics is not None:
                    metrics.forwarded_total.labels("unreachable").inc()
                raise
            if metrics is not None:
                metrics.forwarded_total.labels("ok").inc()
            return

    async def _forward_watched(
        self,
        scope: dict[str, Any],
        receive: Receive,
        send: Send,
        body: bytes,
        tenant: str,
        sid: str,
        owner: Owner,
    ) -> None:
        """Forward to ``owner``, giving up on it if it stops owning the session meanwhile.

        An owner that hangs (paused, cut off from everyone) keeps the connection open
        and never answers, while its lease runs out and another node takes the session
        over: the request must not wait for it for ever. A 502 (the turn may have run
        there; its retry with the same Idempotency-Key is safe) once this node's view
        says the session is no longer that owner's.
        """
        failed: list[Exception] = []
        left = started = False

        async def relay(message: dict[str, Any]) -> None:
            nonlocal started
            started = True
            await send(message)

        async def forward() -> None:
            try:
                await self.forwarder.forward(
                    scope,
                    receive,
                    relay,
                    body=body,
                    tenant=tenant,
                    owner=owner,
                    owner_url=self._url_of(owner),
                )
            except Exception as exc:
                failed.append(exc)
            tg.cancel_scope.cancel()

        async def watch() -> None:
            nonlocal left
            while True:
                await anyio.sleep(OWNER_CHECK_INTERVAL)
                now = self.placement.owner(tenant, sid)
                if now is None or now.node != owner.node:
                    left = True
                    tg.cancel_scope.cancel()
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            tg.start_soon(forward)
        if failed:
            raise failed[0]
        if left:
            logger.warning("node %s left the cluster while serving %s: given up", owner.node, sid)
            if started:  # part of its reply is out: end the connection, the caller sees it cut
                raise ConnectionAbortedError(f"node {owner.node} left mid-reply")
            raise SandboxCrashedError(
                f"node {owner.node}, which owned session {sid}, left the cluster during the "
                "request (its lease ran out); a retry with the same Idempotency-Key is safe"
            )

    def _from_another_machine(self, scope: dict[str, Any], owner: Owner) -> bool:
        """A node on another machine sent this request for a worker of this machine.

        The workers of a machine share its one address (``--advertise``), so a node
        elsewhere reaches whichever worker the kernel picks; that worker passes the
        request on to the owner over its Unix socket (one hop more, never two: the
        owner sees a sender of its own machine).
        """
        if owner.address is None or not owner.address.startswith("unix:"):
            return False
        name = HEADER_FORWARDED_BY.encode()
        sender = next((v for n, v in scope["headers"] if n == name), None)
        if sender is None:
            return False
        here = {m.node for m in self.placement.machine_members()}
        return sender.decode("latin-1") not in here

    def _url_of(self, owner: Owner) -> str | None:
        for member in self.placement.members():
            if member.node == owner.node and member.address and member.address.startswith("http"):
                return member.address
        return None

    async def _misdirected(self, send: Send) -> bool:
        body = b'{"error":{"type":"Misdirected","message":"this node does not own the session"}}'
        await send(
            {
                "type": "http.response.start",
                "status": MISDIRECTED,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})
        return True

    async def _reply(self, send: Send, value: Any, accept: bytes) -> None:
        body, ctype = encode_reply(value, accept)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", ctype), (b"content-length", b"%d" % len(body))],
            }
        )
        await send({"type": "http.response.body", "body": body})

    # -- views across nodes -------------------------------------------------

    async def list_sessions(self, tenant: str) -> list[dict[str, Any]]:
        """Every session of the tenant on every node: resident ones, then dormant ones."""
        views = [
            session_view(s, wall_offset=self.wall_offset) for s in self.host.list_sessions(tenant)
        ]
        others = [m for m in self.placement.members() if m.node != self.placement.node_id]
        missing: list[str] = []

        async def ask(node: str, address: str | None) -> None:
            if address is None:
                return
            owner = Owner(node, False, address)
            try:
                answer = await self.forwarder.get_json(owner, "/v1/sessions?resident=1", tenant)
            except PPIOAgentRuntimeError as exc:
                logger.warning("listing sessions: node %s did not answer: %s", node, exc)
                missing.append(node)
                return
            views.extend(answer.get("sessions", []))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for member in others:
                    tg.start_soon(ask, member.node, member.address)
        seen = {view["session_id"] for view in views}
        for record in await self.host.list_dormant(tenant):
            if record.session_id not in seen:
                views.append(record_view(record))
        return views

    async def machine_metrics(self, own: bytes) -> bytes:
        """``/metrics`` of every worker of this machine, summed (this one's is ``own``);
        the snapshots of those that do not answer add their counters (see .metrics)."""
        texts = [own]
        answered: list[str] = []

        async def ask(member: Member) -> None:
            assert member.address is not None
            try:
                with anyio.fail_after(5):
                    reply = await self.forwarder.get(
                        Owner(member.node, False, member.address), "/metrics?local=1", ""
                    )
            except (PPIOAgentRuntimeError, TimeoutError) as exc:
                logger.warning("metrics: worker %s did not answer: %s", member.node, exc)
                return
            texts.append(reply.content)
            answered.append(reply.headers.get(INCARNATION_HEADER, ""))

        async with anyio.create_task_group() as tg:
            for member in self.placement.machine_members():
                if member.node != self.placement.node_id and member.address is not None:
                    tg.start_soon(ask, member)
        metrics = self.host.metrics
        return merge_expositions(texts, metrics.carried(answered) if metrics else ())

    async def cluster_view(self) -> dict[str, Any]:
        """The members, their load (each one asked) and what this node holds."""
        members: list[dict[str, Any]] = []

        async def describe(member: Member) -> None:
            view: dict[str, Any] = {
                "node": member.node,
                "address": member.address,
                "incarnation": member.incarnation,
                "machine": member.machine,
                "alive": member.alive,
                "load": dict(member.load),
                "self": member.node == self.placement.node_id,
            }
            members.append(view)
            if view["self"]:
                view["load"].update(
                    sessions=len(self.host.directory), running_turns=self.host.running_turns
                )
            elif member.address is not None and member.alive:
                try:
                    with anyio.fail_after(2):
                        answer = await self.forwarder.get_json(
                            Owner(member.node, False, member.address), "/ping", ""
                        )
                except (PPIOAgentRuntimeError, TimeoutError) as exc:
                    view["alive"] = False
                    view["error"] = str(exc)
                else:
                    view["load"].update(
                        sessions=answer.get("sessions"), running_turns=answer.get("running_turns")
                    )

        async with anyio.create_task_group() as tg:
            for member in self.placement.members():
                tg.start_soon(describe, member)
        members.sort(key=lambda view: view["node"])
        return {
            "node": self.placement.node_id,
            "placement": type(self.placement).__name__,
            "members": members,
        }
