"""``python -m ppio_sandbox.agent_runtime path/to/agent.py [--port N | --bind unix:/p]``."""

from __future__ import annotations

import argparse
import sys

from .loader import find_app, load_agent_module


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="python -m ppio_sandbox.agent_runtime",
        description="Serve the PPIOAgentRuntimeApp defined in an agent file. An option left "
        "out keeps the value of the app's own AgentConfig (its defaults are named below); "
        "$PPIO_AGENT_BIND wins over every address option.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("agent_file", help="path to the agent's Python file")
    parser.add_argument("--app", help="name of the app object when the file defines several")
    parser.add_argument(
        "--host",
        help="interface to bind (default 127.0.0.1, loopback only; 0.0.0.0 exposes the agent "
        "on every interface)",
    )
    parser.add_argument("--port", type=int, help="TCP port (default 8080)")
    parser.add_argument("--bind", help="unix:/path/to.sock or host:port; overrides --host/--port")
    parser.add_argument(
        "--backend", choices=["asyncio", "trio"], help="event loop backend (default asyncio)"
    )
    parser.add_argument(
        "--server",
        choices=["hypercorn", "uvicorn", "auto"],
        help="HTTP server (default hypercorn); 'auto': uvicorn when it is installed and the "
        "app runs on asyncio, else hypercorn",
    )
    parser.add_argument(
        "--timeout", type=float, help="per-invocation timeout in seconds (default 300; 0: none)"
    )
    parser.add_argument(
        "--log-level", help="DEBUG, INFO, WARNING, ... (default INFO, DEBUG with debug=True)"
    )
    args = parser.parse_args(argv)
    try:
        app = find_app(load_agent_module(args.agent_file), args.app)
    except (FileNotFoundError, ImportError, LookupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    server = args.server
    if server == "auto":
        from .server import pick_server

        server = pick_server(args.backend or app.config.backend)
    options = {
        k: v
        for k, v in {
            "server": server,
            "timeout": args.timeout,
            "log_level": args.log_level,
        }.items()
        if v is not None
    }
    app.run(port=args.port, host=args.host, bind=args.bind, backend=args.backend, **options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
