"""Server-Sent Events framing for streamed invocations.

One event per chunk: ``id: <seq>`` and ``data: <json>``. A stream that ends
normally sends ``event: done``; one that fails sends ``event: error`` with the
error envelope as data. JSON never contains a raw newline, so every event has
exactly one ``data:`` line.

>>> encode_event(1, "Chunk 1")
b'id: 1\\ndata: "Chunk 1"\\n\\n'
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .protocol import decode_json, encode_json

__all__ = ["SSEEvent", "encode_event", "encode_raw_event", "iter_events"]


def encode_raw_event(seq: int | None, data: bytes, event: str | None = None) -> bytes:
    """Frame already-encoded JSON ``data`` as one event."""
    parts = []
    if event is not None:
        parts.append(b"event: " + event.encode() + b"\n")
    if seq is not None:
        parts.append(b"id: %d\n" % seq)
    parts.append(b"data: " + data + b"\n\n")
    return b"".join(parts)


def encode_event(seq: int | None, value: Any, event: str | None = None) -> bytes:
    """Frame ``value`` (encoded as JSON) as one event."""
    return encode_raw_event(seq, encode_json(value), event)


class SSEEvent:
    """One parsed event: ``event`` is ``"message"`` for a chunk."""

    __slots__ = ("data", "event", "id")

    def __init__(self, event: str, data: str, id: str | None) -> None:
        self.event = event
        self.data = data
        self.id = id

    def json(self) -> Any:
        return decode_json(self.data)

    def __repr__(self) -> str:
        return f"SSEEvent(event={self.event!r}, id={self.id!r}, data={self.data!r})"


def iter_events(lines: Iterator[str]) -> Iterator[SSEEvent]:
    """Parse an SSE stream given line by line (without line endings)."""
    event, ident = "message", None
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield SSEEvent(event, "\n".join(data), ident)
            event, data, ident = "message", [], None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
        elif name == "id":
            ident = value
    if data:
        yield SSEEvent(event, "\n".join(data), ident)
