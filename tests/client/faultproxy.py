"""A fault-injecting HTTP/1.1 proxy for the client's tests: real TCP on 127.0.0.1.

:class:`FaultProxy` sits between a client and a real orchestrator and decides,
request by request, what happens to it:

- :class:`Forward` (the default): relayed both ways, a stream as it comes
  (optionally with some request headers replaced);
- :class:`Reply`: answered by the proxy itself (a 503 burst, a 429 with
  ``Retry-After``...), the orchestrator never sees it;
- :class:`ResetAfterReply`: relayed, and the orchestrator's whole reply read
  (so the turn has run), then the client's connection is reset instead;
- :class:`CutStream`: relayed until ``events`` Server-Sent Events (and
  ``tail`` bytes of the next) reached the client, then the client's
  connection is reset, closed, or its body ended early, and the
  orchestrator's connection closed (its reader is gone).

>>> async def main(base_url):  # doctest: +SKIP
...     async with FaultProxy(base_url) as proxy:
...         proxy.inject(Reply.unavailable(), Reply.unavailable(), path="/invocations")
...         ...  # a client of proxy.base_url: its next two invocations get a 503

Faults injected with :meth:`FaultProxy.inject` are used up in order by the
requests they match; others get :attr:`FaultProxy.default`. Every request is
recorded (:attr:`FaultProxy.requests`). The proxy owns its tasks (one task
group) and closes every socket it opened when it exits.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Self
from urllib.parse import urlsplit

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

__all__ = [
    "CutStream",
    "Fault",
    "FaultProxy",
    "Forward",
    "Reply",
    "ResetAfterReply",
    "SeenRequest",
]

_MAX_HEAD = 64 * 1024


@dataclass(frozen=True)
class Forward:
    """Relay the request and its reply; ``headers`` replace the request's own."""

    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Reply:
    """Answer with ``status`` (an error envelope naming ``kind``) without forwarding."""

    status: int
    kind: str = "ServiceUnavailableError"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def unavailable(cls) -> Reply:
        return cls(503, "ServiceUnavailableError")

    @classmethod
    def too_many(cls, retry_after: float) -> Reply:
        return cls(429, "TooManyRequestsError", (("Retry-After", f"{retry_after:g}"),))


@dataclass(frozen=True)
class ResetAfterReply:
    """Forward, read the orchestrator's whole reply, then reset the client's connection."""


@dataclass(frozen=True)
class CutStream:
    """Relay ``events`` SSE events and ``tail`` bytes of the next, then break the stream.

    ``how``: ``"reset"`` (TCP RST), ``"close"`` (FIN in the middle of the
    chunked body) or ``"end"`` (a well-formed body that just stops).
    """

    events: int
    tail: int = 0
    how: Literal["reset", "close", "end"] = "reset"


Fault = Forward | Reply | ResetAfterReply | CutStream


@dataclass
class _Rule:
    faults: list[Fault]
    matches: Callable[[SeenRequest], bool]


class _Head:
    """A parsed request or status line plus headers."""

    def __init__(self, raw: bytes) -> None:
        lines = raw.decode("latin-1").split("\r\n")
        self.start = lines[0]
        self.fields: list[tuple[str, str]] = []
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                self.fields.append((name.strip(), value.strip()))

    def get(self, name: str) -> str | None:
        for key, value in self.fields:
            if key.lower() == name:
                return value
        return None

    def encode(self, *, drop: frozenset[str] = frozenset(), add: tuple[str, ...] = ()) -> bytes:
        kept = [f"{k}: {v}" for k, v in self.fields if k.lower() not in drop]
        return ("\r\n".join([self.start, *kept, *add]) + "\r\n\r\n").encode("latin-1")


@dataclass
class SeenRequest:
    """One request the proxy received, and what it did with it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    fault: Fault
    at: float
    head: _Head = field(repr=False)

    def json(self) -> object:
        return json.loads(self.body)


class _Abort(Exception):
    """Stop serving this client connection (it was reset or cut)."""


def _reset(stream: anyio.abc.SocketStream) -> None:
    """Make the next close send a TCP RST instead of a FIN."""
    sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class FaultProxy:
    """A programmable proxy in front of ``upstream`` (``http://host:port``)."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self._upstream = (parts.hostname, parts.port)
        self.default: Fault = Forward()
        self.requests: list[SeenRequest] = []
        self.forwarded = 0
        self.base_url = ""
        self._rules: list[_Rule] = []
        self._listener: anyio.abc.SocketListener | None = None
        self._tg: anyio.abc.TaskGroup | None = None

    @property
    def seen(self) -> int:
        """Requests received from clients."""
        return len(self.requests)

    def seen_on(self, path_part: str, method: str = "POST") -> list[SeenRequest]:
        """The requests received whose path contains ``path_part``."""
        return [r for r in self.requests if r.method == method and path_part in r.path]

    def inject(self, *faults: Fault, path: str | None = None, method: str | None = None) -> None:
        """Use ``faults``, in order, for the next requests matching ``path``/``method``."""

        def matches(request: SeenRequest) -> bool:
            return (path is None or path in request.path) and (
                method is None or request.method == method
            )

        self._rules.append(_Rule(list(faults), matches))

    def _choose(self, request: SeenRequest) -> Fault:
        for rule in self._rules:
            if rule.faults and rule.matches(request):
                return rule.faults.pop(0)
        return self.default

    # -- lifetime -------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = self._listener.extra(anyio.abc.SocketAttribute.local_port)
        self.base_url = f"http://127.0.0.1:{port}"
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._listener.serve, self._serve)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tg is not None
        assert self._listener is not None
        self._tg.cancel_scope.cancel()
        try:
            await self._tg.__aexit__(exc_type, exc, tb)
        finally:
            await self._listener.aclose()

    # -- serving --------------------------------------------------------------

    async def _serve(self, client: anyio.abc.SocketStream) -> None:
        async with client:
            reader = BufferedByteReceiveStream(client)
            try:
                while True:
                    request = await self._read_request(reader)
                    if request is None:
                        return
                    await self._handle(client, request)
            except (
                _Abort,
                anyio.EndOfStream,
                anyio.IncompleteRead,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                OSError,
            ):
                return  # a fault ended it, or either side went away

    async def _read_request(self, reader: BufferedByteReceiveStream) -> SeenRequest | None:
        try:
            raw = await reader.receive_until(b"\r\n\r\n", _MAX_HEAD)
        except (anyio.IncompleteRead, anyio.EndOfStream):
            return None  # the client closed its keep-alive connection
        head = _Head(raw)
        method, target, _ = head.start.split(" ", 2)
        length = int(head.get("content-length") or 0)
        if head.get("transfer-encoding"):
            raise _Abort("chunked request bodies are not supported by the fault proxy")
        body = await reader.receive_exactly(length) if length else b""
        headers = {k.lower(): v for k, v in head.fields}
        request = SeenRequest(method, target, headers, body, Forward(), anyio.current_time(), head)
        request.fault = self._choose(request)
        self.requests.append(request)
        return request

    async def _handle(self, client: anyio.abc.SocketStream, request: SeenRequest) -> None:
        fault = request.fault
        if isinstance(fault, Reply):
            await client.send(self._reply_bytes(fault))
            return
        head = request.head
        upstream = await anyio.connect_tcp(*self._upstream)
        async with upstream:
            self.forwarded += 1
            replaced = fault.headers if isinstance(fault, Forward) else ()
            drop = frozenset({"connection", *(name.lower() for name, _ in replaced)})
            add = ("Connection: close", *(f"{name}: {value}" for name, value in replaced))
            await upstream.send(head.encode(drop=drop, add=add) + request.body)
            reader = BufferedByteReceiveStream(upstream)
            reply_head = _Head(await reader.receive_until(b"\r\n\r\n", _MAX_HEAD))
            if isinstance(fault, ResetAfterReply):
                async for _ in self._body(reply_head, reader):
                    pass  # the whole reply: the turn has run
                _reset(client)
                raise _Abort("reset after the reply")
            chunked = (reply_head.get("transfer-encoding") or "").lower() == "chunked"
            if not chunked and reply_head.get("content-length") is None:
                body = b"".join([piece async for piece in self._body(reply_head, reader)])
                await client.send(
                    reply_head.encode(
                        drop=frozenset({"connection"}), add=(f"Content-Length: {len(body)}",)
                    )
                    + body
                )
                return
            await client.send(reply_head.encode(drop=frozenset({"connection"})))
            await self._relay(client, reader, reply_head, chunked, fault)

    async def _relay(
        self,
        client: anyio.abc.SocketStream,
        reader: BufferedByteReceiveStream,
        head: _Head,
        chunked: bool,
        fault: Fault,
    ) -> None:
        cut = fault if isinstance(fault, CutStream) else None
        relayed = b""  # what the client got so far (only kept while cutting)
        async for piece in self._body(head, reader):
            if cut is not None:
                total = relayed + piece
                stop = _event_end(total, cut.events)
                if stop is not None and len(total) >= stop + cut.tail:
                    piece = total[len(relayed) : stop + cut.tail]
                    if piece:
                        await client.send(_frame(piece, chunked))
                    await self._cut(client, cut, chunked)
                relayed = total
            if piece:
                await client.send(_frame(piece, chunked))
        if cut is not None:
            await self._cut(client, cut, chunked)  # the body ended first: cut before its end
        if chunked:
            await client.send(b"0\r\n\r\n")

    async def _cut(self, client: anyio.abc.SocketStream, cut: CutStream, chunked: bool) -> None:
        if cut.how == "end":
            if chunked:
                await client.send(b"0\r\n\r\n")
            await client.aclose()
        elif cut.how == "reset":
            _reset(client)
        raise _Abort(f"stream cut after {cut.events} events ({cut.how})")

    async def _body(self, head: _Head, reader: BufferedByteReceiveStream) -> AsyncIterator[bytes]:
        """The reply's body, piece by piece as it arrives (de-chunked)."""
        if (head.get("transfer-encoding") or "").lower() == "chunked":
            while True:
                size = int((await reader.receive_until(b"\r\n", 1024)).split(b";")[0], 16)
                if size == 0:
                    await reader.receive_until(b"\r\n", _MAX_HEAD)  # (no trailers)
                    return
                data = await reader.receive_exactly(size + 2)
                yield data[:-2]
        elif (length := head.get("content-length")) is not None:
            if int(length):
                yield await reader.receive_exactly(int(length))
        else:
            while True:
                try:
                    yield await reader.receive()
                except anyio.EndOfStream:
                    return

    @staticmethod
    def _reply_bytes(fault: Reply) -> bytes:
        body = json.dumps(
            {
                "error": {
                    "type": fault.kind,
                    "message": f"injected by the fault proxy ({fault.status})",
                }
            }
        ).encode()
        lines = [
            f"HTTP/1.1 {fault.status} Injected",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            *(f"{k}: {v}" for k, v in fault.headers),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _frame(piece: bytes, chunked: bool) -> bytes:
    return b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece


def _event_end(data: bytes, events: int) -> int | None:
    """The offset just past the ``events``-th SSE event in ``data``, if it is there."""
    if events == 0:
        return 0
    end = 0
    for _ in range(events):
        found = data.find(b"\n\n", end)
        if found < 0:
            return None
        end = found + 2
    return end
