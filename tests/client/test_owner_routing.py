"""Going straight to a session's owner node (issue 9), and falling back to the front.

No etcd: real orchestrators on loopback ports play the nodes, and a tiny
real HTTP front (an ASGI app served by hypercorn, :class:`Front`) plays the
node the client is configured with. It forwards each request to the
orchestrator owning the request's session and names that owner in the
reply (``X-PPIO-Owner-URL``), as a cluster node does. Each owner is
advertised as a fault proxy (``faultproxy.py``) in front of its
orchestrator, so the test sees every request that went there directly, and
can make the owner answer 421 or 503. The ``ledger`` agent counts the
executions of a turn: "it ran exactly once" is read back, not assumed.
"""

from __future__ import annotations

import doctest
import functools
import json
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import sniffio
from hypercorn.config import Config
from hypercorn.utils import wrap_app

from ppio_sandbox.agent_runtime.signing import verify_signature
from ppio_sandbox.client import (
    AgentRuntimeClient,
    ClientConfig,
    SessionNotFoundError,
    SyncAgentRuntimeClient,
    _owners,
)
from ppio_sandbox.client._owners import OwnerRoutes, owner_url
from ppio_sandbox.orchestrator.routing import Router
from tests.e2e.helpers import refused_port

from .conftest import Running, tcp_orchestrator
from .faultproxy import FaultProxy, Reply

LEDGER = Path(__file__).parent / "agents" / "ledger"
KEYS = ["t:k1:secret1"]

Scope = dict[str, Any]
_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"te", b"upgrade"}
)


# -- the front: a real HTTP server that forwards to the owner -----------------


@dataclass
class Node:
    """An orchestrator, and the URL the front names as its address (None: names none)."""

    upstream: str
    advertise: str | None


@dataclass
class Seen:
    method: str
    path: str
    session: str | None
    headers: dict[str, str]
    body: bytes


@dataclass
class Front:
    """Forwards to ``nodes[session]`` (``default`` for other requests), naming the owner."""

    default: Node
    nodes: dict[str, Node] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)
    base_url: str = ""
    http: httpx.AsyncClient | None = None

    def about(self, session: str) -> list[Seen]:
        return [r for r in self.requests if r.session == session]

    async def __call__(
        self, scope: Scope, receive: Callable[[], Awaitable[Scope]], send: Any
    ) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        assert scope["type"] == "http"
        assert self.http is not None
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        method, headers = scope["method"], scope["headers"]
        session = Router.session_of(method, scope["path"], headers, body)
        node = self.nodes.get(session, self.default) if session else self.default
        decoded = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}
        self.requests.append(Seen(method, scope["path"], session, decoded, body))
        target = scope["raw_path"] + (
            b"?" + scope["query_string"] if scope["query_string"] else b""
        )
        request = self.http.build_request(
            method,
            httpx.URL(node.upstream).copy_with(raw_path=target),
            # The client's Host is kept: a signature covers it (a proxy that
            # preserves the host, as a cluster node's forwarding does).
            headers=[(k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP],
            content=body,
        )
        response = await self.http.send(request, stream=True)
        try:
            out = [(k, v) for k, v in response.headers.raw if k.lower() not in _HOP_BY_HOP]
            if node.advertise is not None:
                out += [(b"x-ppio-owner", b"node"), (b"x-ppio-owner-url", node.advertise.encode())]
            await send(
                {"type": "http.response.start", "status": response.status_code, "headers": out}
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()


@asynccontextmanager
async def serve_front(default: Node, nodes: dict[str, Node] | None = None) -> AsyncIterator[Front]:
    """``Front`` served by hypercorn on a loopback port, on the test's event loop."""
    if sniffio.current_async_library() == "trio":
        from hypercorn.trio.run import worker_serve
    else:
        from hypercorn.asyncio.run import worker_serve  # type: ignore[assignment]
    front = Front(default, dict(nodes or {}))
    hc = Config()
    hc.bind = ["127.0.0.1:0"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("tests.client.front")
    hc.graceful_timeout = 1
    sockets = hc.create_sockets()
    (sock,) = sockets.insecure_sockets
    sock.listen(hc.backlog)
    front.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    shutdown = anyio.Event()
    app = wrap_app(front, hc.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]
    try:
        async with httpx.AsyncClient(timeout=30, trust_env=False) as http:
            front.http = http
            async with anyio.create_task_group() as tg:
                tg.start_soon(
                    functools.partial(
                        worker_serve, app, hc, sockets=sockets, shutdown_trigger=shutdown.wait
                    )
                )
                try:
                    yield front
                finally:
                    shutdown.set()
    finally:
        sock.close()


# -- the rig ------------------------------------------------------------------


@dataclass
class Rig:
    front: Front
    urls: list[str]  # the orchestrators (where the front forwards)
    owners: list[FaultProxy]  # their advertised addresses (where a client goes direct)
    ledger: Path

    def node(self, i: int, advertise: str | None = None) -> Node:
        return Node(self.urls[i], advertise or self.owners[i].base_url)

    def client(self, api_key: str | None = None, api_secret: str | None = None, **config: Any):
        config.setdefault("retry_backoff", 0.01)
        config.setdefault("timeout", 20)
        return AgentRuntimeClient(
            api_key, api_secret, ClientConfig(base_url=self.front.base_url, **config)
        )

    def request(self, **extra: Any) -> dict[str, Any]:
        """A ledger turn with a fresh token."""
        return {"ledger": str(self.ledger), "token": uuid.uuid4().hex[:8], **extra}

    def executions(self, token: str) -> int:
        lines = self.ledger.read_text().splitlines() if self.ledger.exists() else []
        return lines.count(token)


@asynccontextmanager
async def rig(tmp_path: Path, nodes: int = 1, **options: Any) -> AsyncIterator[Rig]:
    """``nodes`` orchestrators, each behind a fault proxy, and a front; sessions default to #0."""
    async with AsyncExitStack() as stack:
        urls, proxies = [], []
        for i in range(nodes):
            url = await stack.enter_async_context(
                tcp_orchestrator(tmp_path / f"n{i}", templates=("echo", str(LEDGER)), **options)
            )
            urls.append(url)
            proxies.append(await stack.enter_async_context(FaultProxy(url)))
        front = await stack.enter_async_context(serve_front(Node(urls[0], proxies[0].base_url)))
        yield Rig(front, urls, proxies, tmp_path / "ledger.txt")


def about(proxy: FaultProxy, session: str) -> list[Any]:
    """The requests about ``session`` that went straight to this owner."""
    return [
        r
        for r in proxy.requests
        if r.path.split("?")[0].split("/")[3:4] == [session]
        or r.headers.get("x-ppio-session-id") == session
    ]


def same_call(*requests: Any) -> None:
    """The attempts carry the same bytes and the same Idempotency-Key."""
    assert len({r.headers["idempotency-key"] for r in requests}) == 1
    assert len({r.body for r in requests}) == 1


# -- going direct -------------------------------------------------------------


@pytest.mark.anyio
async def test_after_one_reply_a_sessions_requests_go_straight_to_its_owner(
    tmp_path: Path,
) -> None:
    async with rig(tmp_path, nodes=2) as r, r.client() as client:
        a, b = r.owners
        r.front.nodes = {"conv-a": r.node(0), "conv-b": r.node(1)}
        # A named session on each node: the first turn goes through the front.
        for sid, owner in (("conv-a", a), ("conv-b", b)):
            first = await client.invoke_agent("echo", "one", session_id=sid)
            assert first.result["turn"] == 1
            assert len(r.front.about(sid)) == 1
            assert about(owner, sid) == []
        # The next ones go to the owner: the front sees no more of them.
        for sid, owner, other in (("conv-a", a, b), ("conv-b", b, a)):
            second = await client.invoke_agent("echo", "two", session_id=sid)
            chunks = [
                c
                async for c in client.stream_agent(
                    "echo", {"action": "stream", "count": 3}, session_id=sid
                )
            ]
            assert (second.result["turn"], chunks) == (2, [{"i": 0}, {"i": 1}, {"i": 2}])
            assert len(r.front.about(sid)) == 1
            assert len(about(owner, sid)) == 2
            assert about(other, sid) == []
        assert sorted(client._conn.owners.pool_urls) == sorted([a.base_url, b.base_url])

        # A session created through the front (it lives on node 0): its first
        # request about it goes through the front, every later one directly.
        session = await client.create_session("echo")
        sid = session.session_id
        assert (await session.ping())["status"].startswith("Healthy")
        await session.refresh()
        await session.pause()
        await session.resume()
        await session.set_timeout(120)
        assert (await session.invoke("hi")).result["turn"] == 1
        async with session.stream({"action": "stream", "count": 2}) as stream:
            assert [c async for c in stream] == [{"i": 0}, {"i": 1}]
        assert (await client.get_session(sid)).session_id == sid
        await session.close()
        assert [(q.method, q.path.rsplit("/", 1)[-1]) for q in r.front.about(sid)] == [
            ("GET", "ping")
        ]
        assert [(q.method, q.path.split(sid)[-1]) for q in about(a, sid)] == [
            ("GET", ""),
            ("POST", "/pause"),
            ("POST", "/resume"),
            ("POST", "/timeout"),
            ("POST", "/invocations"),
            ("POST", "/invocations"),
            ("GET", ""),
            ("DELETE", ""),
        ]
        # Closed: the owner is forgotten, and the session is gone everywhere.
        with pytest.raises(SessionNotFoundError):
            await client.get_session(sid)
        assert len(r.front.about(sid)) == 2

        # Requests about no particular session always go through the front.
        before = [a.seen, b.seen]
        seen = len(r.front.requests)
        await client.list_sessions()
        await client.list_templates(refresh=True)
        await client.health()
        assert [a.seen, b.seen] == before
        assert len(r.front.requests) == seen + 3


@pytest.mark.anyio
async def test_a_dead_owner_falls_back_to_the_front_and_the_turn_runs_once(
    tmp_path: Path,
) -> None:
    with refused_port() as port:
        dead = f"http://127.0.0.1:{port}"  # nothing listens there, nor can
        await _dead_owner_falls_back(tmp_path, dead)


async def _dead_owner_falls_back(tmp_path: Path, dead: str) -> None:
    async with rig(tmp_path) as r, r.client(max_retries=0) as client:
        (owner,) = r.owners
        r.front.nodes["conv"] = r.node(0, dead)
        await client.invoke_agent("ledger", r.request(), session_id="conv")
        assert client._conn.owners.route("conv") == dead

        # The owner moved (to the proxy's address): the front now says so.
        r.front.nodes["conv"] = r.node(0)
        request = r.request()
        response = await client.invoke_agent(
            "ledger", request, session_id="conv", idempotency_key="k-1"
        )
        assert response.result == {"token": request["token"]}
        assert r.executions(request["token"]) == 1
        # The dead owner refused the connection; the same call went through
        # the front at once (with no retry allowed: the fallback is no retry).
        fallback = r.front.about("conv")[-1]
        assert fallback.headers["idempotency-key"] == "k-1"
        assert json.loads(fallback.body) == request
        assert len(r.front.about("conv")) == 2
        assert about(owner, "conv") == []
        assert client._conn.owners.route("conv") == owner.base_url  # learned from that reply

        # A streamed turn, then a plain one: both straight to the owner now.
        streamed = r.request(stream=3)
        chunks = [c async for c in client.stream_agent("ledger", streamed, session_id="conv")]
        assert chunks == [{"token": streamed["token"], "i": i} for i in range(3)]
        await client.invoke_agent("ledger", r.request(), session_id="conv")
        assert len(r.front.about("conv")) == 2
        assert len(about(owner, "conv")) == 2
        assert r.executions(streamed["token"]) == 1


@pytest.mark.anyio
async def test_421_or_503_from_the_owner_sends_the_same_request_through_the_front(
    tmp_path: Path,
) -> None:
    async with rig(tmp_path) as r, r.client(max_retries=0) as client:
        (owner,) = r.owners
        async with await client.create_session("ledger") as session:
            sid = session.session_id
            await session.ping()  # through the front: the owner is learned
            assert len(r.front.about(sid)) == 1

            owner.inject(Reply(421, "Misdirected"), Reply.unavailable(), path="/invocations")
            plain = r.request()
            assert (await session.invoke(plain)).result == {"token": plain["token"]}
            streamed = r.request(stream=2)
            chunks = [c async for c in session.stream(streamed)]
            assert chunks == [{"token": streamed["token"], "i": i} for i in range(2)]
            for request, status in ((plain, 421), (streamed, 503)):
                at_owner = [q for q in owner.seen_on("/invocations") if q.json() == request]
                at_front = [q for q in r.front.about(sid) if q.body == at_owner[0].body]
                assert [q.fault for q in at_owner] == [
                    Reply(421, "Misdirected") if status == 421 else Reply.unavailable()
                ]
                assert len(at_front) == 1
                same_call(at_owner[0], at_front[0])
                assert r.executions(request["token"]) == 1
            assert owner.forwarded == 0  # the owner's orchestrator saw none of them
            # The front named the owner again: the next turn goes there directly.
            fronted = len(r.front.about(sid))
            await session.invoke(r.request())
            assert len(r.front.about(sid)) == fronted
            assert owner.forwarded == 1

            # Refused once more, and the front's reply names no owner (the
            # session is now the front's own): the owner stays forgotten.
            r.front.nodes[sid] = Node(r.urls[0], None)
            owner.inject(Reply(421, "Misdirected"), path="/invocations")
            await session.invoke(r.request())
            await session.invoke(r.request())
            assert len(r.front.about(sid)) == fronted + 2
            assert (owner.seen_on("/invocations")[-1].fault, owner.forwarded) == (
                Reply(421, "Misdirected"),
                1,
            )


@pytest.mark.anyio
async def test_hmac_requests_are_signed_for_the_url_they_are_sent_to(tmp_path: Path) -> None:
    async with (
        rig(tmp_path, api_keys=KEYS) as r,
        r.client("k1", "secret1", max_retries=0) as client,
    ):
        (owner,) = r.owners
        front_host = r.front.base_url.removeprefix("http://")
        owner_host = owner.base_url.removeprefix("http://")
        first = await client.invoke_agent("echo", "one", session_id="signed")
        second = await client.invoke_agent("echo", "two", session_id="signed")
        assert (first.result["turn"], second.result["turn"]) == (1, 2)  # both accepted
        (via_front,) = r.front.about("signed")
        (direct,) = about(owner, "signed")
        assert via_front.headers["host"] == front_host
        assert direct.headers["host"] == owner_host
        path, _, query = direct.path.partition("?")
        signed = verify_signature(
            "POST", path, query, direct.headers, direct.body, secret="secret1"
        )
        assert signed.access_key == "k1"

        # A fallback is signed afresh, for the front (another host, a new nonce).
        owner.inject(Reply(421, "Misdirected"), path="/invocations")
        third = await client.invoke_agent("echo", "three", session_id="signed")
        assert third.result["turn"] == 3
        refused, fallback = about(owner, "signed")[-1], r.front.about("signed")[-1]
        same_call(refused, fallback)
        assert fallback.headers["host"] == front_host
        assert fallback.headers["x-ppio-nonce"] != refused.headers["x-ppio-nonce"]
        verify_signature("POST", path, query, fallback.headers, fallback.body, secret="secret1")

    async with rig(tmp_path / "bearer", api_keys=KEYS) as r, r.client("secret1") as client:
        (owner,) = r.owners
        for n in (1, 2):
            reply = await client.invoke_agent("echo", "x", session_id="bearer-1")
            assert reply.result["turn"] == n
        (direct,) = about(owner, "bearer-1")
        assert direct.headers["authorization"] == "Bearer secret1"


@pytest.mark.anyio
async def test_no_direct_route_when_turned_off_or_when_the_url_is_no_http_url(
    tmp_path: Path,
) -> None:
    async with rig(tmp_path) as r:
        (owner,) = r.owners
        async with r.client(direct_to_owner=False) as client:
            assert client._conn.owners is None
            for n in (1, 2, 3):
                assert (await client.invoke_agent("echo", "x", session_id="off")).result[
                    "turn"
                ] == n
            assert len(r.front.about("off")) == 3
        async with r.client() as client:
            for i, advertised in enumerate(
                ("unix:/run/ppio/w1.sock", "ftp://127.0.0.1:21", r.front.base_url)
            ):
                sid = f"odd-{i}"
                r.front.nodes[sid] = r.node(0, advertised)
                for _ in range(2):
                    await client.invoke_agent("echo", "x", session_id=sid)
                assert len(r.front.about(sid)) == 2
            assert len(client._conn.owners) == 0
        assert owner.seen == 0  # none went direct


# -- bounds and lifetime ------------------------------------------------------


def _reply(url: str) -> httpx.Response:
    return httpx.Response(200, headers={"X-PPIO-Owner-URL": url})


def test_docstring_examples() -> None:
    result = doctest.testmod(_owners)
    assert (result.failed, result.attempted > 0) == (0, True)


def test_the_session_cache_is_a_bounded_lru() -> None:
    routes = OwnerRoutes("http://front", httpx.AsyncClient, max_sessions=2)
    routes.learn("s1", _reply("http://n1:1"))
    routes.learn("s2", _reply("http://n2:1"))
    assert routes.route("s1") == "http://n1:1"  # used: s2 is now the oldest
    routes.learn("s3", _reply("http://n3:1"))
    assert (routes.route("s1"), routes.route("s2"), routes.route("s3")) == (
        "http://n1:1",
        None,
        "http://n3:1",
    )
    routes.forget("s1", "http://elsewhere:1")  # another owner was learned meanwhile: kept
    assert routes.route("s1") == "http://n1:1"
    routes.learn("s1", _reply("http://front"))  # the front itself owns it now
    assert routes.route("s1") is None
    routes.learn("s3", httpx.Response(200))  # a reply naming no owner changes nothing
    assert routes.route("s3") == "http://n3:1"
    assert owner_url("https://n1:8900/", "https://front") == "https://n1:8900"
    for bad in (
        "",
        "unix:/x.sock",
        "http://",
        "http://u:p@n1",
        "http://n1?x=1",
        "http://n 1",
        "http://n1:99999",
    ):
        assert owner_url(bad, "http://front") is None, bad
    assert owner_url("http://n1", "https://front") is None


@pytest.mark.anyio
async def test_pools_are_bounded_and_an_evicted_pool_outlives_its_open_stream(
    tmp_path: Path,
) -> None:
    async with rig(tmp_path, nodes=2) as r, r.client() as client:
        a, b = r.owners
        r.front.nodes = {"conv-a": r.node(0), "conv-b": r.node(1)}
        owners = client._conn.owners
        owners.max_pools = 1
        for sid in ("conv-a", "conv-b", "conv-a"):  # the owners learned; a's pool opened
            await client.invoke_agent("echo", "x", session_id=sid)
        first_a = owners._pools[a.base_url].http
        await client.invoke_agent("echo", "x", session_id="conv-b")
        assert owners.pool_urls == [b.base_url]
        assert first_a.is_closed  # evicted while idle: closed at once

        stream = client.stream_agent(
            "echo", {"action": "stream", "count": 3, "delay": 0.05}, session_id="conv-b"
        )
        assert await stream.__anext__() == {"i": 0}  # open, straight to b
        pool_b = owners._pools[b.base_url].http
        await client.invoke_agent("echo", "x", session_id="conv-a")  # evicts b's pool...
        assert owners.pool_urls == [a.base_url]
        assert not pool_b.is_closed  # ...which still serves the open stream
        assert [c async for c in stream] == [{"i": 1}, {"i": 2}]
        assert pool_b.is_closed  # and is closed with it
        assert (len(about(a, "conv-a")), len(about(b, "conv-b"))) == (2, 2)

        # close() is aclose(): the client's sessions, then every pool.
        pool_a = owners._pools[a.base_url].http
        session = await client.create_session("echo")
        await client.close()
        assert session.closed
        assert client.http_client.is_closed
        assert pool_a.is_closed
        assert owners.pool_urls == []
        assert len(owners) == 0


def test_the_sync_client_closes_too(served: Running) -> None:
    client = SyncAgentRuntimeClient(
        config=ClientConfig(base_url="http://orchestrator"),
        transport=httpx.AsyncHTTPTransport(uds=str(served.sock)),
    )
    loop_thread = client._portal.call(threading.current_thread)
    session = client.create_session("echo")
    assert session.invoke("hi").result["turn"] == 1
    client.close()
    assert session.session.closed
    assert client.client.http_client.is_closed
    loop_thread.join(5)
    assert not loop_thread.is_alive()
    client.close()  # twice is fine
