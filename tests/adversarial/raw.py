"""A raw HTTP/1.1 client: bytes out exactly as given, the reply parsed by hand.

httpx normalises paths, refuses odd headers and sets ``Content-Length``
itself; the adversarial tests need to send what a hostile client would.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc

__all__ = ["Reply", "build_request", "connect", "exchange", "read_reply"]


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)


async def connect(target: Path | tuple[str, int]) -> anyio.abc.SocketStream:
    """A connection to a Unix socket path or a ``(host, port)``."""
    if isinstance(target, Path):
        return await anyio.connect_unix(target)
    return await anyio.connect_tcp(*target)


def build_request(
    method: str | bytes,
    target: str | bytes,
    headers: list[tuple[str | bytes, str | bytes]],
    body: bytes = b"",
    *,
    content_length: bool | int = True,
    chunked: bool = False,
    close: bool = True,
) -> bytes:
    """One request's bytes. ``content_length``: True for the body's length, an int
    to declare another one (a mismatch), False for none."""

    def b(value: str | bytes) -> bytes:
        return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")

    lines = [b(method) + b" " + b(target) + b" HTTP/1.1", b"host: orchestrator"]
    lines += [b(name) + b": " + b(value) for name, value in headers]
    if chunked:
        lines.append(b"transfer-encoding: chunked")
        payload = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    else:
        if content_length is not False:
            declared = len(body) if content_length is True else content_length
            lines.append(b"content-length: %d" % declared)
        payload = body
    if close:
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload


class _Buffered:
    def __init__(self, stream: anyio.abc.ByteReceiveStream) -> None:
        self.stream = stream
        self.data = bytearray()
        self.eof = False

    async def fill(self) -> bool:
        if self.eof:
            return False
        try:
            chunk = await self.stream.receive(65536)
        except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
            self.eof = True
            return False
        self.data += chunk
        return True

    async def until(self, marker: bytes) -> bytes:
        while (at := self.data.find(marker)) < 0:
            if not await self.fill():
                raise EOFError(f"connection closed before {marker!r}: {bytes(self.data)[:200]!r}")
        out = bytes(self.data[:at])
        del self.data[: at + len(marker)]
        return out

    async def exactly(self, n: int) -> bytes:
        while len(self.data) < n:
            if not await self.fill():
                raise EOFError(f"connection closed {n - len(self.data)} bytes short")
        out = bytes(self.data[:n])
        del self.data[:n]
        return out

    async def rest(self) -> bytes:
        while await self.fill():
            pass
        out = bytes(self.data)
        self.data.clear()
        return out


# What was read past a reply stays with its stream, for the next reply on it.
_BUFFERS: weakref.WeakKeyDictionary[anyio.abc.ByteReceiveStream, _Buffered] = (
    weakref.WeakKeyDictionary()
)


async def read_reply(stream: anyio.abc.ByteReceiveStream, *, head: bool = False) -> Reply:
    """Read one reply (Content-Length, chunked, or to the end of the stream); 1xx are skipped."""
    buf = _BUFFERS.get(stream)
    if buf is None:
        buf = _BUFFERS[stream] = _Buffered(stream)
    while True:
        reply = await _read(buf, head)
        if not 100 <= reply.status < 200:
            return reply


async def _read(buf: _Buffered, head: bool) -> Reply:
    status_line, *lines = (await buf.until(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    headers = []
    for line in lines:
        name, _, value = line.partition(":")
        headers.append((name.strip().lower(), value.strip()))
    reply = Reply(status, headers)
    if head or status in (204, 304) or 100 <= status < 200:
        return reply
    length = reply.header("content-length")
    if length is not None:
        reply.body = await buf.exactly(int(length))
    elif (reply.header("transfer-encoding") or "").lower() == "chunked":
        parts = []
        while True:
            size = int((await buf.until(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await buf.until(b"\r\n")
                break
            parts.append(await buf.exactly(size))
            await buf.exactly(2)
        reply.body = b"".join(parts)
    else:
        reply.body = await buf.rest()
    return reply


async def exchange(
    target: Path | tuple[str, int], request: bytes, *, timeout: float = 10.0
) -> Reply:
    """Send ``request`` on a new connection and read one reply (within ``timeout``)."""
    with anyio.fail_after(timeout):
        async with await connect(target) as stream:
            await stream.send(request)
            return await read_reply(stream)
