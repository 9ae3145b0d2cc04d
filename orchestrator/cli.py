"""``ppio-sandbox-cli``: the command line.

``serve`` starts the orchestrator. ``agent deploy|invoke|list`` and
``session list|close`` talk to a running orchestrator through the client
(:mod:`ppio_sandbox.client._cli`); every one takes ``--json``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def _serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the orchestrator (sessions, templates, API)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8900, help="TCP port (default 8900)")
    p.add_argument("--bind", help="unix:/path or host:port; overrides --host/--port")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".ppio-orchestrator"),
        help="where templates, their database and sandboxes' working directories live "
        "(default .ppio-orchestrator, in the current directory)",
    )
    p.add_argument(
        "--template",
        action="append",
        default=[],
        type=Path,
        metavar="PATH",
        help="register and deploy a template directory at start-up (repeatable)",
    )
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="[TENANT:]KEY_ID:SECRET",
        help="accept this API key (repeatable); also $PPIO_ORCHESTRATOR_KEYS (comma-separated "
        "keys) and --keys-file; the tenant defaults to 'default'. Default: no keys, so no "
        "authentication and loopback only",
    )
    p.add_argument(
        "--keys-file",
        action="append",
        default=[],
        type=Path,
        metavar="PATH",
        help="file of API keys (repeatable): one [TENANT:]KEY_ID:SECRET per line, blank lines "
        'and lines starting with # skipped; or JSON {"keys": [{"tenant": ..., "key_id": ..., '
        '"secret": ...}]} (the tenant is optional, "default" by default)',
    )
    p.add_argument(
        "--worker",
        choices=["asyncio", "uvloop", "trio"],
        default=None,
        help="event loop (default: uvloop when installed, else asyncio)",
    )
    p.add_argument(
        "--warm-pool",
        type=int,
        help="process sandboxes kept warm per template (default: each template's "
        "spec.sandbox.warm_pool, 0 unless it says)",
    )
    p.add_argument(
        "--trust-uploads",
        action="store_true",
        help="let templates uploaded by tenants (POST /v1/templates) run in-process as their "
        "spec asks; without it they run as process sandboxes, since in-process code shares "
        "the orchestrator's memory (--template directories may always run in-process; "
        "default off)",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="seconds running turns may take to finish on SIGTERM (default 30)",
    )
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ... (default INFO)")
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="text: 'time level logger: message key=value...'; json: one JSON object a line "
        "(time, level, logger, message and the line's fields). Default text",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds a client has to send a request's headers (default 10; 0: no deadline); "
        "idle keep-alive connections are kept 75 s",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=60.0,
        help="seconds a client has to send a request's body once its headers are in "
        "(default 60; 0: no deadline)",
    )
    p.add_argument(
        "--durability",
        choices=["turn", "interval", "none"],
        default="interval",
        help="when sessions are checkpointed so they outlive a restart or their node: "
        "'turn' before each turn's reply (no acknowledged turn is lost), 'interval' every "
        "--checkpoint-interval seconds (default; a crash loses at most that), 'none' never",
    )
    p.add_argument(
        "--checkpoint-interval",
        type=float,
        default=1.0,
        help="seconds between checkpoints with --durability interval (default 1)",
    )
    p.add_argument(
        "--server",
        choices=["hypercorn", "uvicorn"],
        default="hypercorn",
        help="HTTP server: hypercorn (default; asyncio or trio) or uvicorn (httptools and "
        "uvloop, asyncio only; pip install 'ppio-agent-runtime[fast]')",
    )
    p.add_argument(
        "--workers",
        default="1",
        help="worker processes behind the one address, each on its own core: a number, or "
        "'auto' for the usable cores (default 1); a supervising parent restarts one that dies",
    )
    p.add_argument(
        "--cluster",
        default=None,
        help="etcd://HOST:PORT[,HOST:PORT...]: join the cluster whose membership and sessions "
        "live in that etcd (also $PPIO_CLUSTER)",
    )
    p.add_argument(
        "--node-id",
        default=None,
        help="this node's name in the cluster (default HOSTNAME-PORT)",
    )
    p.add_argument(
        "--advertise",
        default=None,
        help="the URL other nodes and clients reach this node at (default http://HOST:PORT)",
    )
    p.add_argument(
        "--lease-ttl",
        type=float,
        default=5.0,
        help="seconds a dead node keeps its sessions before others take them over (default 5)",
    )
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--isolation",
        choices=["auto", "bwrap", "none"],
        default="auto",
        help="walls around process sandboxes: 'auto' the strongest this host offers "
        "(bubblewrap namespaces, own uid, cgroups; each missing wall logged), 'bwrap' refuse "
        "to run without them, 'none' plain processes (default auto)",
    )
    p.add_argument(
        "--sandbox-server",
        choices=["auto", "hypercorn", "uvicorn"],
        default="auto",
        help="the HTTP server of the agent runtime in process sandboxes: 'auto' uvicorn when "
        "it is installed (pip install 'ppio-agent-runtime[fast]') and the agent runs on "
        "asyncio, else hypercorn (default auto)",
    )


_EXAMPLES = """\
examples:
  ppio-sandbox-cli serve --template examples/templates/assistant
  ppio-sandbox-cli agent deploy --config .ppio-agent.yaml
  ppio-sandbox-cli agent invoke --template-id assistant --input "hello" [--stream]
  ppio-sandbox-cli agent list --json
  ppio-sandbox-cli session list
  ppio-sandbox-cli session close ID
"""


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser for ``argv``: the client's commands are left out when it runs ``serve``.

    The orchestrator never imports the client (nor the client the
    orchestrator): only the command line, which offers both, brings them
    together, and then only for the client's own commands.
    """
    parser = argparse.ArgumentParser(
        prog="ppio-sandbox-cli",
        description="Serve the orchestrator; deploy, invoke and list agents and sessions on it.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    if list(argv[:1]) != ["serve"]:
        from ppio_sandbox.client._cli import add_commands

        add_commands(sub)
    return parser


def _version() -> str:
    from ppio_sandbox.agent_runtime import __version__

    return str(__version__)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the command; the exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(arguments)
    args = parser.parse_args(arguments)
    if args.command != "serve":
        from ppio_sandbox.client._cli import run

        return run(args)
    from .server import ServeOptions, serve_blocking

    workers = _workers(parser, args.workers)
    options = ServeOptions(
        host=args.host,
        port=args.port,
        bind=args.bind,
        data_dir=args.data_dir,
        templates=list(args.template),
        api_keys=list(args.api_key),
        keys_files=list(args.keys_file),
        worker=args.worker,
        warm_pool=args.warm_pool,
        trust_uploads=args.trust_uploads,
        grace=args.grace,
        log_level=args.log_level,
        log_format=args.log_format,
        header_timeout=args.header_timeout or None,
        body_timeout=args.body_timeout or None,
        durability=args.durability,
        checkpoint_interval=args.checkpoint_interval,
        isolation=args.isolation,
        sandbox_server=args.sandbox_server,
        server=args.server,
        workers=workers,
        worker_index=args.worker_index,
        listen_fd=args.listen_fd,
        cluster=args.cluster or os.environ.get("PPIO_CLUSTER") or None,
        node_id=args.node_id,
        advertise=args.advertise,
        lease_ttl=args.lease_ttl,
    )
    if workers > 1 and args.worker_index is None:
        from .server import serve_workers

        return serve_workers(options, arguments)
    return serve_blocking(options)


def _workers(parser: argparse.ArgumentParser, value: str) -> int:
    if value == "auto":
        from .supervisor import usable_cores

        return usable_cores()
    try:
        count = int(value)
    except ValueError:
        parser.error(f"--workers must be a number or 'auto', not {value!r}")
    if not 1 <= count <= 256:
        parser.error("--workers must be between 1 and 256")
    return count


if __name__ == "__main__":
    sys.exit(main())
