"""Property-based fuzzing of every ``/v1`` endpoint: never a 5xx, never down, memory bounded.

One orchestrator per backend runs on an event loop in a background thread
of this process (so ``/proc/self/status`` measures it); Hypothesis draws
batches of hostile requests (see ``strategies.py``), each sent on a
connection of its own. After every batch ``/ping`` must answer within 2 s,
and the harness puts back the sessions the batch may have closed or paused.
The heavy run is on asyncio; trio gets a fifth of the examples. Run with
``-s`` to see the figures (requests, 5xx, RSS before and after).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import Server, agent_archive, serve, vm_rss_kib
from .raw import Reply, build_request, connect, read_reply
from .strategies import IDS, Hostile, hostile_invocations, hostile_requests, mangled_paths

HEAVY = "asyncio"
RESET = 0
"""The status recorded when a malformed request's connection was reset."""
RSS_GROWTH_BOUND_KIB = 64 * 1024
"""The fuzzing may grow the process by at most 64 MiB (it creates a few hundred
sessions, each a few KB, and Hypothesis keeps its own state in this process)."""


def examples(backend: str, heavy: int) -> int:
    return heavy if backend == HEAVY else max(10, heavy // 5)


@dataclass
class Figures:
    backend: str
    sent: int = 0
    harness: int = 0
    batches: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    successes: Counter[str] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    slowest_ping: float = 0.0
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    started: float = field(default_factory=time.monotonic)


class Fuzzer:
    """Sends hostile requests through the portal and keeps the figures."""

    def __init__(self, portal: BlockingPortal, server: Server, backend: str) -> None:
        self.portal = portal
        self.server = server
        self.figures = Figures(backend)

    # -- sending --

    def send(self, request: Hostile) -> Reply:
        reply = self.portal.call(self._send, request)
        figures = self.figures
        figures.sent += 1
        figures.statuses[reply.status] += 1
        if 200 <= reply.status < 300 and request.route:
            figures.successes[request.route] += 1
        if reply.status >= 500:
            figures.server_errors.append(f"{request!r} -> {reply.status} {reply.body[:300]!r}")
        return reply

    async def _send(self, request: Hostile) -> Reply:
        headers: list[tuple[str | bytes, str | bytes]] = list(request.headers)
        if request.content_type is not None:
            headers.append((b"content-type", request.content_type))
        headers += self._auth(request)
        data = build_request(
            request.method,
            request.target,
            headers,
            request.body,
            content_length=request.content_length,
            chunked=request.chunked,
        )
        with anyio.fail_after(10):
            async with await connect(self.server.target) as stream:
                try:
                    await stream.send(data)
                    if request.half_close:
                        await stream.send_eof()
                except anyio.BrokenResourceError:
                    pass  # the server answered early and closed: read what it said
                try:
                    return await read_reply(stream, head=request.method == "HEAD")
                except (EOFError, anyio.BrokenResourceError) as exc:
                    if (
                        not request.wire_valid()
                        or request.half_close
                        or request.sends_more_than_declared()
                    ):
                        # hypercorn refuses malformed HTTP before the body is
                        # read, and closes a connection whose request can never
                        # be complete (it declared more than it sent, then
                        # stopped sending), or whose next request is garbage
                        # (the bytes past the declared length): the reply may be
                        # lost or cut short (closed with unread bytes, the
                        # socket resets, and the peer drops what it had not read).
                        return Reply(RESET, [], repr(exc).encode())
                    # A well-formed request and no reply: as bad as a 5xx here.
                    return Reply(599, [], repr(exc).encode())

    def _auth(self, request: Hostile) -> list[tuple[str | bytes, str | bytes]]:
        if request.auth == "alpha":
            return [("authorization", "Bearer secret-alpha")]
        if request.auth == "bad":
            return [("authorization", "Bearer nope")]
        if request.auth == "none":
            return []
        path, _, query = request.target.decode("latin-1").partition("?")
        ctype = None if request.content_type is None else request.content_type.decode("latin-1")
        try:
            return list(self.server.auth("gamma", request.method, path, request.body, ctype, query))
        except ValueError:
            return []

    # -- the batch's aftermath --

    def after_batch(self) -> None:
        self.figures.batches += 1
        took = self.portal.call(self.server.ping, 2.0)
        self.figures.slowest_ping = max(self.figures.slowest_ping, took)
        self.portal.call(self.restore)

    async def restore(self) -> None:
        """Put back alpha's two sessions as the fuzzing expects them, through the API.

        A session the batch closed is created again under its id where the
        server allows it (it may keep the id taken, then that id stays a 404).
        """
        server = self.server
        reply = await server.call("alpha", "GET", "/v1/sessions")
        assert reply.status == 200, reply
        status = {s["session_id"]: s["status"] for s in json.loads(reply.body)["sessions"]}
        self.figures.harness += 1
        for sid in (IDS["own_invoke"], IDS["own_life"]):
            if sid not in status:
                body = json.dumps({"template_id": "fuzz", "session_id": sid}).encode()
                reply = await server.call("alpha", "POST", "/v1/sessions", body)
                assert reply.status in (201, 400), reply
            elif status[sid] == "paused":
                reply = await server.call("alpha", "POST", f"/v1/sessions/{sid}/resume")
                assert reply.status == 200, reply
            else:
                continue
            self.figures.harness += 1

    async def setup(self) -> None:
        """Beta's session and uploaded template; alpha's sessions; a warm-up."""
        server = self.server
        reply = await server.call(
            "beta",
            "POST",
            "/v1/sessions",
            b'{"template_id": "fuzz", "session_id": "%s"}' % IDS["other_session"].encode(),
        )
        assert reply.status == 201, reply
        reply = await server.call(
            "beta",
            "POST",
            "/v1/templates",
            agent_archive("beta-agent", template_id=IDS["other_template"]),
            content_type="application/gzip",
        )
        assert reply.status == 202, reply
        await self.restore()
        for _ in range(50):  # warm-up: imports, caches, first sessions
            await server.call("alpha", "POST", "/v1/sessions/fz/invocations", b'{"prompt": "hi"}')
            await server.call("alpha", "GET", "/v1/sessions")
        self.figures.harness += 102


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def fuzzer(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fuzzer]:
    backend = str(request.param)
    tmp: Path = tmp_path_factory.mktemp(f"fuzz-{backend}")
    # Short deadlines: a request that lies about its body must not hold up the run.
    with (
        start_blocking_portal(backend) as portal,
        portal.wrap_async_context_manager(
            serve(tmp, header_timeout=2.0, body_timeout=2.0)
        ) as server,
    ):
        fuzzer = Fuzzer(portal, server, backend)
        portal.call(fuzzer.setup)
        fuzzer.figures.rss_before_kib = vm_rss_kib()
        yield fuzzer


FUZZ = settings(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def run_batch(fuzzer: Fuzzer, batch: list[Hostile]) -> None:
    for request in batch:
        reply = fuzzer.send(request)
        assert reply.status < 500, f"{request!r} -> {reply.status} {reply.body[:500]!r}"
    fuzzer.after_batch()


def test_every_endpoint_survives_hostile_requests(fuzzer: Fuzzer) -> None:
    @settings(FUZZ, max_examples=examples(fuzzer.figures.backend, 320))
    @given(st.lists(hostile_requests(), min_size=1, max_size=8))
    def check(batch: list[Hostile]) -> None:
        run_batch(fuzzer, batch)

    check()


def test_invocations_survive_hostile_payloads_and_headers(fuzzer: Fuzzer) -> None:
    """The hot path, always reached: alpha's own session or agent, hostile bodies and headers."""

    @settings(FUZZ, max_examples=examples(fuzzer.figures.backend, 80))
    @given(st.lists(hostile_invocations(), min_size=1, max_size=8))
    def check(batch: list[Hostile]) -> None:
        run_batch(fuzzer, batch)

    check()


def test_paths_and_ids_survive_mangling(fuzzer: Fuzzer) -> None:
    """The same, weighted to paths: every route with mangled ids, as GET/POST/PUT/DELETE."""

    @settings(FUZZ, max_examples=examples(fuzzer.figures.backend, 100))
    @given(
        st.lists(
            st.tuples(st.sampled_from(["GET", "POST", "PUT", "DELETE"]), mangled_paths()),
            min_size=1,
            max_size=10,
        )
    )
    def check(batch: list[tuple[str, bytes]]) -> None:
        run_batch(fuzzer, [Hostile(method, target, body=b"{}") for method, target in batch])

    check()


def test_other_tenants_resources_are_untouched(fuzzer: Fuzzer) -> None:
    """After all that, beta's session and template are as beta left them."""

    async def beta_view() -> dict[str, Any]:
        server = fuzzer.server
        session = await server.call("beta", "GET", f"/v1/sessions/{IDS['other_session']}")
        template = await server.call("beta", "GET", f"/v1/templates/{IDS['other_template']}")
        assert session.status == 200, session
        assert template.status == 200, template
        return {"session": session.body, "template": template.status}

    view = fuzzer.portal.call(beta_view)
    session = json.loads(view["session"])
    assert session["status"] == "ready", session
    assert session["turns"] == {"ok": 0, "failed": 0, "queued": 0}, session
    assert session["metadata"] == {}, session


def test_figures(fuzzer: Fuzzer) -> None:
    """Memory stayed bounded; print the run's figures (``-s`` shows them)."""
    figures = fuzzer.figures
    figures.rss_after_kib = vm_rss_kib()
    growth = figures.rss_after_kib - figures.rss_before_kib
    print(
        f"\n[adversarial fuzz, {figures.backend}] requests sent: {figures.sent} "
        f"(+{figures.harness} by the harness) in {figures.batches} batches, "
        f"{time.monotonic() - figures.started:.1f} s; 5xx: {len(figures.server_errors)}; "
        f"statuses: {dict(sorted(figures.statuses.items()))}; slowest /ping after a batch: "
        f"{figures.slowest_ping * 1000:.1f} ms; "
        f"RSS before {figures.rss_before_kib / 1024:.1f} MiB, "
        f"after {figures.rss_after_kib / 1024:.1f} MiB (growth {growth / 1024:+.1f} MiB, "
        f"bound {RSS_GROWTH_BOUND_KIB / 1024:.0f} MiB); 2xx by route: "
        f"{dict(sorted(figures.successes.items()))}"
    )
    assert figures.server_errors == []
    assert figures.sent >= (1200 if figures.backend == HEAVY else 200)
    assert growth <= RSS_GROWTH_BOUND_KIB
