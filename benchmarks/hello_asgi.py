"""Baseline server: a bare raw-ASGI hello world on hypercorn.

It reads the request body and answers any request with a small JSON body,
served with the same hypercorn settings and event loop as the agent runtime::

    python -m benchmarks.hello_asgi --bind 127.0.0.1:8000 --backend asyncio

SIGTERM or SIGINT stops it gracefully.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

import anyio

BODY = b'{"result":"hello","status":"success"}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answer every HTTP request with :data:`BODY`; accept lifespan events."""
    if scope["type"] == "http":
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": BODY})
    elif scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


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


async def serve(bind: str) -> None:
    """Serve :func:`app` on the running anyio backend until SIGTERM/SIGINT."""
    import sniffio

    config = hypercorn_config(bind)
    shutdown = anyio.Event()
    if sniffio.current_async_library() == "trio":
        from hypercorn.trio import serve as hypercorn_serve
    else:
        from hypercorn.asyncio import serve as hypercorn_serve  # type: ignore[assignment]

    async with anyio.create_task_group() as tg:

        async def run_server() -> None:
            await hypercorn_serve(app, config, shutdown_trigger=shutdown.wait)  # type: ignore[arg-type]
            tg.cancel_scope.cancel()

        tg.start_soon(run_server)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                if shutdown.is_set():
                    tg.cancel_scope.cancel()
                shutdown.set()


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hello_asgi", description=__doc__)
    parser.add_argument("--bind", default="127.0.0.1:8000", help="host:port")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.backend == "trio":
        anyio.run(serve, args.bind, backend="trio")
        return 0
    try:
        import uvloop  # noqa: F401
    except ImportError:
        options: dict[str, Any] = {}
    else:
        options = {"use_uvloop": True}
    anyio.run(serve, args.bind, backend="asyncio", backend_options=options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
