"""Baseline servers: a bare raw-ASGI hello world, and a bare SSE stream.

``hello`` reads the request body and answers any request with a small JSON
body; ``sse`` answers a POST with ``count`` Server-Sent Events (``count``
from the JSON body, default 1000), one ``send`` per event and a checkpoint
between events, as a streaming agent yields control. Both are served with
the agent runtime's hypercorn settings and event loop, or on uvicorn with
the settings of the runtime's ``server="uvicorn"`` option (asyncio only)::

    python -m benchmarks.hello_asgi --bind 127.0.0.1:8000 --backend asyncio
    python -m benchmarks.hello_asgi --bind 127.0.0.1:8000 --server uvicorn
    python -m benchmarks.hello_asgi --bind 127.0.0.1:8000 --app sse --backend trio

``unavailable`` answers 503 to everything but ``GET /ping`` (retry amplification).

SIGTERM or SIGINT stops it gracefully.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel

BODY = b'{"result":"hello","status":"success"}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]
SSE_CHUNKS = 1000
"""Events per stream when the body names no ``count``."""

App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


async def _read_body(receive: Any) -> bytes:
    parts = []
    more = True
    while more:
        message = await receive()
        parts.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(parts)


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answer every HTTP request with :data:`BODY`; accept lifespan events."""
    if scope["type"] == "http":
        await _read_body(receive)
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": BODY})
    elif scope["type"] == "lifespan":
        await _lifespan(receive, send)


def _count(body: bytes) -> int:
    try:
        value = json.loads(body or b"{}").get("count", SSE_CHUNKS)
    except (ValueError, AttributeError):
        return SSE_CHUNKS
    return int(value) if isinstance(value, int) and value >= 0 else SSE_CHUNKS


async def sse_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """POST: stream ``count`` events ``data: "Chunk N"``; GET: answer :data:`BODY`."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    body = await _read_body(receive)
    if scope["method"] != "POST":
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": BODY})
        return
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
    for index in range(1, _count(body) + 1):
        event = b'data: "Chunk %d"\n\n' % index
        await send({"type": "http.response.body", "body": event, "more_body": True})
        await anyio.lowlevel.checkpoint()
    await send({"type": "http.response.body", "body": b"", "more_body": False})


UNAVAILABLE = b'{"error":{"type":"ServiceUnavailableError","message":"unavailable (benchmark)"}}'
UNAVAILABLE_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", b"%d" % len(UNAVAILABLE)),
]


async def unavailable_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answer 503 (the orchestrator's error envelope) to everything but ``GET /ping``."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    await _read_body(receive)
    if scope["path"] == "/ping":
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": BODY})
        return
    await send({"type": "http.response.start", "status": 503, "headers": UNAVAILABLE_HEADERS})
    await send({"type": "http.response.body", "body": UNAVAILABLE})


APPS: dict[str, App] = {"hello": app, "sse": sse_app, "unavailable": unavailable_app}


def hypercorn_config(bind: str) -> Any:
    """The runtime's hypercorn settings (see ``agent_runtime/server.py``)."""
    from hypercorn.config import Config

    config = Config()
    config.bind = [bind]
    config.graceful_timeout = 30.0
    config.keep_alive_timeout = 75.0
    config.accesslog = None
    errorlog = logging.getLogger("benchmarks.hello_asgi")
    errorlog.setLevel(logging.WARNING)
    config.errorlog = errorlog
    return config


async def serve(bind: str, asgi: App = app) -> None:
    """Serve ``asgi`` with hypercorn on the running anyio backend until SIGTERM/SIGINT."""
    import sniffio

    config = hypercorn_config(bind)
    shutdown = anyio.Event()
    if sniffio.current_async_library() == "trio":
        from hypercorn.trio import serve as hypercorn_serve
    else:
        from hypercorn.asyncio import serve as hypercorn_serve  # type: ignore[assignment]

    async with anyio.create_task_group() as tg:

        async def run_server() -> None:
            await hypercorn_serve(asgi, config, shutdown_trigger=shutdown.wait)  # type: ignore[arg-type]
            tg.cancel_scope.cancel()

        tg.start_soon(run_server)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                if shutdown.is_set():
                    tg.cancel_scope.cancel()
                shutdown.set()


def serve_uvicorn(bind: str, asgi: App = app) -> None:
    """Serve ``asgi`` on uvicorn with the runtime's ``server="uvicorn"`` settings."""
    import uvicorn

    host, _, port = bind.rpartition(":")
    uvicorn.run(
        asgi,
        host=host.strip("[]"),
        port=int(port),
        lifespan="on",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=30,
        timeout_keep_alive=75,
    )


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hello_asgi", description=__doc__)
    parser.add_argument("--bind", default="127.0.0.1:8000", help="host:port")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--server", choices=["hypercorn", "uvicorn"], default="hypercorn")
    parser.add_argument("--app", choices=sorted(APPS), default="hello")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    asgi = APPS[args.app]
    if args.server == "uvicorn":
        if args.backend != "asyncio":
            parser.error("uvicorn runs on asyncio only")
        serve_uvicorn(args.bind, asgi)
        return 0
    if args.backend == "trio":
        anyio.run(serve, args.bind, asgi, backend="trio")
        return 0
    try:
        import uvloop  # noqa: F401
    except ImportError:
        options: dict[str, Any] = {}
    else:
        options = {"use_uvloop": True}
    anyio.run(serve, args.bind, asgi, backend="asyncio", backend_options=options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
