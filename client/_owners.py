"""Going straight to the node that owns a session (issue 9).

In a cluster any node accepts any request and forwards one for a session
another node owns; the reply names that node in ``X-PPIO-Owner-URL``.
:class:`OwnerRoutes` remembers, per session, the owner URL the last reply
named (a small LRU), so that the session's next requests go there directly
and skip the extra hop. What it keeps:

- which URL owns which session (``max_sessions`` of them, least recently
  used forgotten first); only an ``http(s)`` URL without credentials, query
  or fragment is taken, never an ``http`` one when the configured base URL
  is ``https`` (credentials are not downgraded to plain text), and one
  equal to the base URL is just "no shortcut";
- one ``httpx.AsyncClient`` (connection pool) per distinct owner URL, at
  most ``max_pools``: the least recently used one is retired, and closed as
  soon as no response of it is open any more (a stream keeps its pool);
  all are closed with the client.

Only a request about one session is routed (its path is
``/v1/sessions/{id}...``, or it is an agent invocation naming the session
in ``X-PPIO-Session-Id``): what :func:`session_of` says, the same rule as
the server's router. Falling back to the base URL when the owner does not
answer is :class:`~._connection.ApiConnection`'s business.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from urllib.parse import unquote

import anyio
import httpx

from ppio_sandbox.agent_runtime.protocol import HEADER_SESSION_ID

__all__ = ["HEADER_OWNER_URL", "OwnerRoutes", "owner_url", "session_of"]

logger = logging.getLogger("ppio_sandbox.client")

HEADER_OWNER_URL = "X-PPIO-Owner-URL"
_HOST = re.compile(r"[a-z0-9._:-]+")  # a host name, an IPv4 or an IPv6 address (as httpx gives it)


def session_of(path: str, headers: Mapping[str, str]) -> str | None:
    """The session a request is about, if it names one (the server's rule).

    >>> session_of("/v1/sessions/s%201/invocations", {})
    's 1'
    >>> session_of("/v1/agents/echo/invocations", {"X-PPIO-Session-Id": "conv-1"})
    'conv-1'
    >>> session_of("/v1/sessions", {}) is None, session_of("/v1/templates/x", {}) is None
    (True, True)
    """
    parts = path.split("/")  # ['', 'v1', 'sessions', id, ...]
    if len(parts) >= 4 and parts[1] == "v1" and parts[2] == "sessions" and parts[3]:
        return unquote(parts[3])
    if len(parts) == 5 and parts[1:3] == ["v1", "agents"] and parts[4] == "invocations":
        for name, value in headers.items():
            if name.lower() == HEADER_SESSION_ID.lower():
                return value or None
    return None


def owner_url(value: str | None, base_url: str) -> str | None:
    """The owner URL a reply's ``X-PPIO-Owner-URL`` gives, if it may be used.

    >>> owner_url("http://10.0.0.2:8900/", "http://front:8900")
    'http://10.0.0.2:8900'
    >>> [owner_url(v, "http://front") for v in ("unix:/run/w1.sock", "ftp://h", "http://u:p@h")]
    [None, None, None]
    >>> owner_url("http://10.0.0.2:8900", "https://front")  # no downgrade to plain text
    """
    if not value:
        return None
    try:
        url = httpx.URL(value.strip())
    except (httpx.InvalidURL, ValueError, TypeError):
        return None
    if url.scheme not in ("http", "https") or url.userinfo or url.query or url.fragment:
        return None
    if not url.host or not _HOST.fullmatch(url.host):
        return None
    if url.port is not None and not 0 < url.port < 65536:
        return None
    if url.scheme == "http" and base_url.startswith("https:"):
        return None
    return str(url).rstrip("/")


class _Pool:
    """One owner's connection pool, and how many of its responses are open."""

    __slots__ = ("http", "leases", "retired", "url")

    def __init__(self, url: str, http: httpx.AsyncClient) -> None:
        self.url = url
        self.http = http
        self.leases = 0
        self.retired = False


class _Leased(httpx.AsyncByteStream):
    """A response body that gives its pool back when it is closed."""

    def __init__(self, inner: httpx.AsyncByteStream, release: Callable[[], Awaitable[None]]):
        self._inner = inner
        self._release: Callable[[], Awaitable[None]] | None = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            release, self._release = self._release, None
            if release is not None:
                await release()


class OwnerRoutes:
    """Sessions' owner URLs (an LRU) and a bounded set of pools to them."""

    def __init__(
        self,
        base_url: str,
        make_client: Callable[[str], httpx.AsyncClient],
        *,
        max_sessions: int = 4096,
        max_pools: int = 16,
    ) -> None:
        if max_sessions < 1 or max_pools < 1:
            raise ValueError("max_sessions and max_pools must be >= 1")
        self.base_url = owner_url(base_url, base_url) or base_url
        self.max_sessions = max_sessions
        self.max_pools = max_pools
        self._make_client = make_client
        self._owners: OrderedDict[str, str] = OrderedDict()
        self._pools: OrderedDict[str, _Pool] = OrderedDict()
        self._retired: set[_Pool] = set()  # evicted, still serving an open response
        self._closed = False

    def __len__(self) -> int:
        return len(self._owners)

    @property
    def pool_urls(self) -> list[str]:
        """The owner URLs a pool is open to, least recently used first."""
        return list(self._pools)

    # -- which URL ----------------------------------------------------------

    def route(self, session: str) -> str | None:
        """The owner URL to send ``session``'s next request to, or None (the base URL)."""
        if self._closed:
            return None
        url = self._owners.get(session)
        if url is not None:
            self._owners.move_to_end(session)
        return url

    def learn(self, session: str, response: httpx.Response) -> None:
        """Remember the owner a reply names (a reply naming none changes nothing)."""
        url = owner_url(response.headers.get(HEADER_OWNER_URL), self.base_url)
        if url is None:
            return
        if url == self.base_url:
            self._owners.pop(session, None)
            return
        self._owners[session] = url
        self._owners.move_to_end(session)
        while len(self._owners) > self.max_sessions:
            self._owners.popitem(last=False)

    def forget(self, session: str, url: str | None = None) -> None:
        """Stop going direct for ``session`` (only if it still maps to ``url``, when given)."""
        if url is None or self._owners.get(session) == url:
            self._owners.pop(session, None)

    # -- sending ------------------------------------------------------------

    async def send(
        self, url: str, build: Callable[[httpx.AsyncClient], httpx.Request]
    ) -> httpx.Response:
        """Send ``build(owner's client)`` there; the response is open, as ``send(stream=True)``."""
        pool = await self._acquire(url)
        pool.leases += 1
        try:
            response = await pool.http.send(build(pool.http), stream=True)
        except BaseException:
            await self._release(pool)
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)

        async def release() -> None:
            await self._release(pool)

        response.stream = _Leased(response.stream, release)
        return response

    async def _acquire(self, url: str) -> _Pool:
        if self._closed:
            raise RuntimeError("the client is closed")
        pool = self._pools.get(url)
        if pool is not None:
            self._pools.move_to_end(url)
            return pool
        pool = self._pools[url] = _Pool(url, self._make_client(url))
        while len(self._pools) > self.max_pools:
            _, old = self._pools.popitem(last=False)
            old.retired = True
            if old.leases:
                self._retired.add(old)  # closed when its last response is
            else:
                await self._close(old)
        return pool

    async def _release(self, pool: _Pool) -> None:
        pool.leases -= 1
        if pool.retired and pool.leases == 0 and pool in self._retired:
            self._retired.discard(pool)
            await self._close(pool)

    @staticmethod
    async def _close(pool: _Pool) -> None:
        with anyio.CancelScope(shield=True):
            await pool.http.aclose()

    async def aclose(self) -> None:
        """Close every pool (open responses of them break); nothing is routed afterwards."""
        self._closed = True
        pools = [*self._pools.values(), *self._retired]
        self._pools.clear()
        self._retired.clear()
        self._owners.clear()
        for pool in pools:
            pool.retired = True
            await self._close(pool)
