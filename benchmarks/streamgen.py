"""A Server-Sent Events reader for streaming benchmarks, run in its own process.

``N`` readers each hold one HTTP/1.1 keep-alive connection and, in a closed
loop, ``POST`` the same request and read its chunked SSE response to the
end, counting data events (``event: done`` closes a stream and is not
counted; ``event: error`` is an error). Chunks received in the measured
window (after a warm-up) are counted; time to first chunk is taken per
stream from the request's write to its first data event. When the window
ends, streams still running are cut. The result is printed as one JSON
object on stdout::

    python -m benchmarks.streamgen --port 8000 --readers 50 --chunks 1000 \\
        --warmup 1 --duration 2 --server-pid PID

Each stream must carry exactly ``--chunks`` data events; any other count is
an error (``short stream``). Like :mod:`benchmarks.loadgen`, it reports its
own CPU use and the server's (``--server-pid``, Linux): a reader near 100 %
of a core is the bottleneck and its figures are lower bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .loadgen import CpuMeter, Window, generator_command, percentile, print_result

__all__ = ["Options", "command", "main", "run"]


@dataclass
class Options:
    """What to send, where, and for how long."""

    host: str = "127.0.0.1"
    port: int = 8000
    path: str = "/invocations"
    body: bytes = b'{"count":1000}'
    readers: int = 1
    chunks: int = 1000
    """Data events every stream must carry."""
    warmup: float = 1.0
    duration: float = 2.0
    server_pid: int | None = None
    io_timeout: float = 10.0
    """Seconds to connect, and to read a response head."""
    session_prefix: str = "stream-"


@dataclass
class _State(Window):
    chunks: int = 0
    """Data events received inside the measured window."""
    streams: int = 0
    """Streams finished inside the measured window."""
    ttfc: list[int] = field(default_factory=list)
    """Time to first chunk of each stream, in ns."""
    ttfc_sent: list[int] = field(default_factory=list)
    """When each of those streams was sent (same order)."""
    durations: list[int] = field(default_factory=list)
    # ``stop`` is set when the window ends: a reader whose cancellation was
    # swallowed (``asyncio.wait_for`` can, on Python 3.11) still stops.


class StreamError(Exception):
    """A response that is not the expected stream."""


def build_request(opts: Options, index: int) -> bytes:
    """Reader ``index``'s request: its own session id, keep-alive."""
    head = (
        f"POST {opts.path} HTTP/1.1\r\n"
        f"Host: {opts.host}:{opts.port}\r\n"
        "Content-Type: application/json\r\n"
        "Accept: text/event-stream\r\n"
        f"Content-Length: {len(opts.body)}\r\n"
        f"X-PPIO-Session-Id: {opts.session_prefix}{index}\r\n"
        "\r\n"
    )
    return head.encode("latin-1") + opts.body


def _count_events(block: bytes) -> tuple[int, bool]:
    """Data events in complete events ``block``; whether it holds ``event: error``."""
    events = block.count(b"\n\n")
    if b"event:" not in block:
        return events, False
    failed = False
    for event in block.split(b"\n\n")[:-1]:
        if event.startswith(b"event:") or b"\nevent:" in event:
            events -= 1
            failed = failed or b"event: error" in event or b"event:error" in event
    return events, failed


async def _stream(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    request: bytes,
    opts: Options,
    state: _State,
) -> bool:
    """One request and its whole chunked SSE response; whether the connection closes."""
    clock = time.perf_counter_ns
    writer.write(request)
    sent = clock()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), opts.io_timeout)
    lower = head.lower()
    close = b"\r\nconnection: close" in lower
    if head[9:12] != b"200":
        raise StreamError(f"status {head[9:12].decode('latin-1')}")
    if b"\r\ntransfer-encoding: chunked" not in lower:
        raise StreamError("not chunked")
    raw = b""
    sse = b""
    events = 0
    first = 0
    while True:
        # Take every complete HTTP chunk out of `raw` into `sse`.
        finished = False
        while True:
            crlf = raw.find(b"\r\n")
            if crlf < 0:
                break
            size = int(raw[:crlf].split(b";", 1)[0], 16)
            if size == 0:
                if raw.find(b"\r\n\r\n", crlf) < 0:
                    break  # the last chunk's trailing CRLF is still to come
                finished = True
                break
            end = crlf + 2 + size
            if len(raw) < end + 2:
                break
            sse += raw[crlf + 2 : end]
            raw = raw[end + 2 :]
        cut = sse.rfind(b"\n\n")
        if cut >= 0:
            count, failed = _count_events(sse[: cut + 2])
            sse = sse[cut + 2 :]
            if failed:
                raise StreamError("event: error")
            if count:
                now = clock()
                events += count
                if not first:
                    first = now
                    state.ttfc.append(now - sent)
                    state.ttfc_sent.append(sent)
                if state.start_ns <= now < state.end_ns:
                    state.chunks += count
        if finished:
            break
        if state.stop:
            return True  # the window is over: cut the stream
        data = await reader.read(65536)
        if not data:
            raise EOFError("connection closed mid-stream")
        raw += data
    done = clock()
    if events != opts.chunks:
        raise StreamError(f"short stream ({events} of {opts.chunks} chunks)")
    if state.start_ns <= done < state.end_ns:
        state.streams += 1
        state.durations.append(done - sent)
    return close


async def _reader(opts: Options, state: _State, index: int) -> None:
    """One closed-loop reader; reconnects after any error until stopped."""
    request = build_request(opts, index)
    while not state.stop:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(opts.host, opts.port), opts.io_timeout
            )
        except (OSError, TimeoutError) as exc:
            state.error(f"connect: {type(exc).__name__}")
            await asyncio.sleep(0.05)  # back off; the server may be overloaded
            continue
        state.connects += 1
        try:
            while not state.stop and not await _stream(reader, writer, request, opts, state):
                pass
        except StreamError as exc:
            state.error(str(exc).split(" (")[0])
        except (OSError, EOFError, ValueError, TimeoutError, asyncio.LimitOverrunError) as exc:
            state.error(type(exc).__name__)
        finally:
            writer.close()
        await asyncio.sleep(0.01)  # a server that keeps failing is not hammered


async def run(opts: Options) -> dict[str, Any]:
    """Read streams for ``warmup + duration`` seconds; return the result."""
    state = _State.after(opts.warmup, opts.duration)
    start_ns = state.start_ns
    tasks = [asyncio.create_task(_reader(opts, state, i)) for i in range(opts.readers)]
    meter = CpuMeter(opts.server_pid)
    try:
        await asyncio.sleep(opts.warmup)
        meter.start()
        await asyncio.sleep(max(0.0, (state.end_ns - time.perf_counter_ns()) / 1e9))
        cpu = meter.stop()
    finally:
        state.stop = True
        for task in tasks:
            task.cancel()
        _, stuck = await asyncio.wait(tasks, timeout=opts.io_timeout)
    # Time to first chunk of streams sent after the warm-up; all streams when
    # too few were (a slow server with many readers starts few streams).
    late = [t for t, sent in zip(state.ttfc, state.ttfc_sent, strict=True) if sent >= start_ns]
    ttfc_all = len(late) < opts.readers
    ttfc = sorted(state.ttfc if ttfc_all else late)
    durations = sorted(state.durations)
    ms = 1e-6
    return {
        "readers": opts.readers,
        "chunks_per_stream": opts.chunks,
        "chunks": state.chunks,
        "chunks_per_s": round(state.chunks / opts.duration, 1),
        "streams": state.streams,
        "ttfc_samples": len(ttfc),
        "ttfc_includes_warmup": ttfc_all,
        "ttfc_p50": round(percentile(ttfc, 0.50) * ms, 3),
        "ttfc_p99": round(percentile(ttfc, 0.99) * ms, 3),
        "ttfc_max": round(percentile(ttfc, 1.0) * ms, 3),
        "stream_p50": round(percentile(durations, 0.50) * ms, 3),
        "stream_p99": round(percentile(durations, 0.99) * ms, 3),
        "errors": sum(state.errors.values()),
        "error_kinds": dict(state.errors),
        "connects": state.connects,
        "stuck_readers": len(stuck),
        "duration": round(opts.duration, 3),
        "warmup": opts.warmup,
        **cpu.report(busy=False),
    }


def command(opts: Options) -> list[str]:
    """The command line that runs ``opts`` in a fresh process (harness side)."""
    return generator_command(
        "benchmarks.streamgen",
        opts.host,
        opts.port,
        opts.warmup,
        opts.duration,
        opts.server_pid,
        "--path",
        opts.path,
        "--body",
        opts.body.decode(),
        "--readers",
        str(opts.readers),
        "--chunks",
        str(opts.chunks),
    )


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: run, print the result as JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.streamgen", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--path", default="/invocations")
    parser.add_argument("--body", default='{"count":1000}')
    parser.add_argument("--readers", type=int, default=1)
    parser.add_argument("--chunks", type=int, default=1000)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--server-pid", type=int)
    args = parser.parse_args(argv)
    if args.readers < 1 or args.chunks < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--readers and --chunks must be >= 1, --duration > 0, --warmup >= 0")
    opts = Options(
        host=args.host,
        port=args.port,
        path=args.path,
        body=args.body.encode(),
        readers=args.readers,
        chunks=args.chunks,
        warmup=args.warmup,
        duration=args.duration,
        server_pid=args.server_pid,
    )
    return print_result(run(opts))


if __name__ == "__main__":
    sys.exit(main())
