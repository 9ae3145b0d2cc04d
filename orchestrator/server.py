"""Running the orchestrator on hypercorn: the one module that knows the backends.

asyncio (uvloop when installed) serves the Quart API; trio serves the same
routes on QuartTrio. SIGTERM or SIGINT: stop accepting, let running turns
finish for ``grace`` seconds, close every sandbox, exit 0.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import secrets
import shutil
import signal
import socket
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import sniffio

from ppio_sandbox.agent_runtime.server import KeyValueFormatter

from .auth import Authenticator, KeyRing
from .checkpoints import Durability
from .cluster.membership import ClusterPlacement
from .forwarding import Forwarder
from .host import SHARED_TENANT, Orchestrator, OrchestratorConfig
from .placement import Placement, SingleNode, WorkerSet
from .routing import Router
from .session_core import SessionLimits
from .state_store import StateStore
from .templates import TemplateStore

__all__ = ["ServeOptions", "run", "serve_blocking"]

logger = logging.getLogger("ppio_sandbox.orchestrator")

_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8900
    bind: str | None = None
    data_dir: Path = field(default_factory=lambda: Path(".ppio-orchestrator"))
    templates: list[Path] = field(default_factory=list)
    template_tenant: str = SHARED_TENANT
    api_keys: list[str] = field(default_factory=list)
    keys_files: list[Path] = field(default_factory=list)
    worker: str | None = None
    warm_pool: int | None = None
    trust_uploads: bool = False
    """Let tenants' uploads run in-process (``serve --trust-uploads``); off, they run as
    process sandboxes whatever their spec asks (see :mod:`._policy`)."""
    grace: float = 30.0
    log_level: str = "INFO"
    log_format: str = "text"
    """``text`` (``time level logger: message key=value...``) or ``json`` (one object a line)."""
    environ: dict[str, str] | None = None
    limits: SessionLimits | None = None
    stream_resume_grace: float = 10.0
    header_timeout: float | None = 10.0
    """Seconds a client has to send a request's headers, counted from the connection's
    start or the request's first byte (None: no deadline); idle keep-alive connections
    between requests last ``KEEP_ALIVE_TIMEOUT``. See :mod:`._hypercorn`."""
    body_timeout: float | None = 60.0
    """Seconds a client has to send a request's body once its headers are in (then a 408)."""
    durability: Durability = Durability.INTERVAL
    """When sessions are checkpointed: ``turn``, ``interval`` or ``none`` (:mod:`.checkpoints`)."""
    checkpoint_interval: float = 1.0
    isolation: str = "auto"
    """Walls around process sandboxes: ``auto``, ``bwrap`` or ``none`` (docs/sandboxing.md)."""
    sandbox_server: str = "auto"
    """The runtime's HTTP server in process sandboxes: ``auto``, ``hypercorn`` or ``uvicorn``."""
    server: str = "hypercorn"
    """The HTTP server: ``hypercorn`` (asyncio or trio) or ``uvicorn`` (asyncio only)."""
    workers: int = 1
    """Worker processes on this machine (``serve --workers``; see :mod:`.supervisor`)."""
    worker_index: int | None = None
    """Set in a worker by its supervisor: which one of ``workers`` this process is."""
    listen_fd: int | None = None
    """Set in a worker by its supervisor: the listening socket it inherited."""
    cluster: str | None = None
    """``etcd://host:port[,host:port...]``: join that cluster (``serve --cluster``)."""
    node_id: str | None = None
    advertise: str | None = None
    """The URL other nodes reach this one at (``http://host:port``)."""
    lease_ttl: float = 5.0
    tune_gc: bool = False
    """Tune the process's garbage collector for many long-lived sessions (see
    :func:`tune_gc`); :func:`serve_blocking`, which owns the process, sets it."""


KEEP_ALIVE_TIMEOUT = 75.0
"""Seconds an idle keep-alive connection is kept (longer than common proxies' 60 s)."""
BACKLOG = 4096
"""Listen backlog (hypercorn's default is 100; the kernel caps it at somaxconn)."""

GC_THRESHOLDS = (50_000, 20, 100)
"""Young-generation collections after 50,000 allocations instead of 700.

With thousands of sessions alive, CPython's default thresholds run a
collection every few hundred allocations and full ones that walk every
session: measured with 3,000 streaming sessions, 19 full collections took
7.4 s of a run, and these thresholds made 63 % more turns per second."""


def tune_gc() -> None:
    """Move what start-up allocated out of the collector's sight, then raise its thresholds.

    Called once templates are loaded: the modules, templates and caches made
    so far live as long as the process, so ``gc.freeze()`` spares every
    later collection from walking them.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _bind_address(options: ServeOptions, auth_enabled: bool) -> str:
    if options.bind:
        bind = options.bind
        host = "unix" if bind.startswith("unix:") else bind.rpartition(":")[0]
    else:
        host = options.host
        bind = f"[{host}]:{options.port}" if ":" in host else f"{host}:{options.port}"
    if not auth_enabled and host != "unix" and host not in _LOOPBACK:
        logger.warning(
            "no API keys configured: binding 127.0.0.1 instead of %s; "
            "pass --api-key or set PPIO_ORCHESTRATOR_KEYS to serve other hosts",
            host,
        )
        port = bind.rpartition(":")[2]
        bind = f"127.0.0.1:{port}"
    return bind


async def run(
    options: ServeOptions,
    *,
    shutdown: anyio.Event | None = None,
    install_signal_handlers: bool = True,
    task_status: anyio.abc.TaskStatus[Orchestrator] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown`` is set or a signal arrives.

    ``task_status.started(host)`` is reported once the listening socket is
    bound and listens: a connection made from then on is queued and served.
    """
    from hypercorn.utils import wrap_app

    from ._hypercorn import Config
    from ._hypercorn import install as install_deadlines
    from .api import create_api
    from .frontend import FrontDoor
    from .metrics import OrchestratorMetrics

    keyring = KeyRing.load(options.api_keys, environ=options.environ, files=options.keys_files)
    authenticator = Authenticator(keyring)
    bind = _bind_address(options, authenticator.enabled)
    if not authenticator.enabled:
        logger.warning("no API keys configured: authentication is off (loopback only)")
    on_trio = sniffio.current_async_library() == "trio"
    if options.server not in ("hypercorn", "uvicorn"):
        raise SystemExit(f"--server must be hypercorn or uvicorn, not {options.server!r}")
    if options.server == "uvicorn" and on_trio:
        raise SystemExit("--server uvicorn runs on asyncio only; use --worker asyncio|uvloop")
    # hypercorn's worker_serve (what its serve() runs) takes sockets already
    # bound: run() binds them itself, so it knows when they listen.
    if on_trio:
        from hypercorn.trio.run import worker_serve
        from quart_trio import QuartTrio as app_class
    else:
        from hypercorn.asyncio.run import worker_serve  # type: ignore[assignment]
        from quart import Quart as app_class  # type: ignore[assignment]

    config = OrchestratorConfig(
        data_dir=options.data_dir,
        shutdown_grace=options.grace,
        warm_pool=options.warm_pool,
        trust_uploads=options.trust_uploads,
        limits=options.limits or SessionLimits(),
        stream_resume_grace=options.stream_resume_grace,
        durability=Durability(options.durability),
        checkpoint_interval=options.checkpoint_interval,
        isolation=options.isolation,
        sandbox_server=options.sandbox_server,
    )
    shutdown = shutdown or anyio.Event()
    placement, internal_bind, store = _placement(options, bind)
    templates = TemplateStore(options.data_dir, shared=options.worker_index is not None)
    snapshots = options.data_dir / "metrics" if options.worker_index is not None else None
    metrics = OrchestratorMetrics(snapshots=snapshots)  # a worker's: see .metrics
    async with Orchestrator(
        config, templates=templates, store=store, ownership=placement, metrics=metrics
    ) as host:
        if isinstance(placement, ClusterPlacement):
            from .cluster.template_index import EtcdTemplateIndex

            placement.on_lost = host.sessions.evict_all
            host.template_index = EtcdTemplateIndex(placement.client, placement.prefix)
        await placement.start(host.task_group)
        for path in options.templates:
            template = await host.register_directory(path, options.template_tenant)
            logger.info("template %s from %s: %s", template.id, path, template.phase)
        api = create_api(host, app_class)
        router = forwarder = None
        if placement.multi_node:
            token = await _cluster_token(options, placement)
            forwarder = Forwarder(placement.node_id, token, retry_after=placement.retry_after)
            router = Router(host, placement, forwarder)
        front = FrontDoor(host, api, authenticator, metrics=host.metrics, router=router)
        if options.tune_gc:
            tune_gc()
        hc = Config()
        hc.bind = [f"fd://{options.listen_fd}" if options.listen_fd is not None else bind]
        if internal_bind is not None:
            hc.bind.append(internal_bind)
        # Sessions are long-lived and their callers think between turns: keep
        # their connections (hypercorn's default closes them after 5 idle
        # seconds), and queue bursts of new ones rather than refuse them.
        hc.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
        hc.backlog = BACKLOG
        # hypercorn has no deadlines on reading a request: a slow client held
        # its connection for the whole keep-alive timeout, or for ever.
        install_deadlines()
        hc.header_timeout = options.header_timeout
        hc.body_timeout = options.body_timeout
        # Turns are drained by the orchestrator while HTTP still answers (so a
        # turn cut off at the end of the grace gets a 503 envelope); hypercorn
        # then only has replies in flight to finish.
        hc.graceful_timeout = min(options.grace, 5.0)
        hc.accesslog = None
        hc.errorlog = logging.getLogger("ppio_sandbox.orchestrator.server")
        app = wrap_app(front, hc.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]
        forced = anyio.Event()
        async with anyio.create_task_group() as tg:

            async def serve_http(*, task_status: anyio.abc.TaskStatus[None]) -> None:
                # Bound and listening before started(): from then on a client's
                # connection waits in the backlog until hypercorn accepts it.
                sockets = hc.create_sockets()
                listening = [*sockets.secure_sockets, *sockets.insecure_sockets]
                try:
                    for sock in listening:
                        sock.listen(hc.backlog)
                    task_status.started()
                    if options.server == "uvicorn":
                        await _serve_uvicorn(front, listening, shutdown, options.grace)
                    else:
                        await worker_serve(app, hc, sockets=sockets, shutdown_trigger=shutdown.wait)
                except Exception as exc:
                    # hypercorn's asyncio worker raises InvalidStateError when
                    # its graceful wait is cancelled: a forced stop, not a crash.
                    if not forced.is_set():
                        raise
                    logger.debug("HTTP server stopped by force: %r", exc)
                finally:
                    for sock in listening:
                        sock.close()
                tg.cancel_scope.cancel()

            await tg.start(serve_http)
            logger.info("orchestrator listening on %s (data in %s)", bind, options.data_dir)
            task_status.started(host)
            if install_signal_handlers:
                await _on_signals(shutdown, forced, host, tg, options.grace)
        logger.info("HTTP stopped; closing %d sessions", len(host.directory))
        with anyio.CancelScope(shield=True):
            await host.shutdown(grace=0)
            await placement.close()
            if forwarder is not None:
                await forwarder.aclose()
    logger.info("orchestrator stopped")


async def _serve_uvicorn(
    front: Any, sockets: list[socket.socket], shutdown: anyio.Event, grace: float
) -> None:
    """``serve --server uvicorn``: the same application on uvicorn (httptools, uvloop).

    Signals stay ours (drain first): uvicorn's own handlers are left out by
    serving through ``Server._serve``, the part of ``Server.serve`` inside its
    signal capture. hypercorn's request deadlines (``--header-timeout``,
    ``--body-timeout``) do not apply; uvicorn closes idle keep-alive
    connections after ``KEEP_ALIVE_TIMEOUT`` and bounds incomplete requests by size.
    """
    import uvicorn

    try:
        import httptools  # noqa: F401
    except ImportError:
        http = "h11"
    else:
        http = "httptools"
    config = uvicorn.Config(
        front,
        http=http,
        lifespan="off",
        access_log=False,
        log_config=None,
        timeout_keep_alive=int(KEEP_ALIVE_TIMEOUT),
        timeout_graceful_shutdown=int(min(grace, 5.0)),
        backlog=BACKLOG,
    )
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:

        async def stop_on_shutdown() -> None:
            await shutdown.wait()
            server.should_exit = True

        tg.start_soon(stop_on_shutdown)
        await server._serve(sockets=sockets)
        tg.cancel_scope.cancel()


async def _cluster_token(options: ServeOptions, placement: Placement) -> str:
    """The secret nodes prove themselves to each other with (see :mod:`.forwarding`).

    ``$PPIO_CLUSTER_TOKEN`` when set; in an etcd cluster, else the one the
    first node stored in etcd (readable by whoever may read etcd, which is
    the cluster's trust boundary anyway).
    """
    environ = options.environ if options.environ is not None else os.environ
    token = environ.get("PPIO_CLUSTER_TOKEN")
    if token:
        return token
    if isinstance(placement, ClusterPlacement):
        return await placement.shared_token()
    if options.worker_index is not None:
        raise SystemExit("PPIO_CLUSTER_TOKEN must be set for the workers of a machine")
    return secrets.token_urlsafe(24)


def _placement(options: ServeOptions, bind: str) -> tuple[Placement, str | None, StateStore | None]:
    """This node's placement, the extra address other nodes reach it at, its state store."""
    internal: str | None = None
    if options.worker_index is not None:
        path = options.data_dir / "run" / f"w{options.worker_index}.sock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by this slot's previous worker
        internal = f"unix:{path}"
    if options.cluster:
        from .cluster._etcd import EtcdClient, parse_cluster_url
        from .cluster.etcd_store import EtcdStateStore

        client = EtcdClient(parse_cluster_url(options.cluster))
        node = options.node_id or f"{socket.gethostname()}-{bind.rpartition(':')[2]}"
        if options.worker_index is not None:
            node = f"{node}-w{options.worker_index}"
        cluster = ClusterPlacement(
            client,
            node_id=node,
            address=options.advertise or _default_advertise(bind),
            internal=internal,
            ttl=options.lease_ttl,
        )
        store: StateStore | None = None
        if options.durability != "none":
            # One prefix for both: a won claim reads the store's key for the session
            # (ClusterPlacement.checkpoint_absent).
            store = EtcdStateStore(client, cluster.prefix, retry_after=cluster.retry_after)
        return cluster, internal, store
    if options.worker_index is not None:
        workers = WorkerSet(options.worker_index, options.workers, options.data_dir / "run")
        return workers, internal, None
    return SingleNode(), None, None


def _default_advertise(bind: str) -> str:
    if bind.startswith("unix:"):
        raise SystemExit("--cluster needs a TCP address (--host/--port) or --advertise URL")
    host, _, port = bind.rpartition(":")
    if host in ("0.0.0.0", "[::]", "::"):
        host = socket.gethostname()
    return f"http://{host}:{port}"


async def _on_signals(
    shutdown: anyio.Event,
    forced: anyio.Event,
    host: Orchestrator,
    tg: anyio.abc.TaskGroup,
    grace: float,
) -> None:
    """First signal: drain, then stop HTTP. Second: stop now (sandboxes still closed)."""

    async def drain_then_stop() -> None:
        await host.drain(grace)
        shutdown.set()

    draining = False
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if draining:
                logger.warning("second signal: stopping now (sandboxes are still closed)")
                forced.set()
                tg.cancel_scope.cancel()
                return
            draining = True
            logger.info(
                "%s: no new turns; draining %d running (up to %.0f s)",
                signal.Signals(signum).name,
                host.running_turns,
                grace,
            )
            host.accepting = False
            tg.start_soon(drain_then_stop)


_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``time``, ``level``, ``logger``, ``message``, the record's
    extra fields (an access line's ``method``, ``path``, ``status``, ``session_id``,
    ``request_id``, ``duration_ms``), ``worker`` under ``--workers``, ``exc_info``."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker
        self._encode = json.JSONEncoder(default=str).encode  # built once: C-accelerated

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker is not None:
            line["worker"] = self.worker
        for key, value in record.__dict__.items():  # the extra fields, in their order
            if key not in _RECORD_FIELDS and value is not None and key[0] != "_":
                line[key] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        return self._encode(line)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


def _setup_logging(options: ServeOptions) -> None:
    if options.log_format not in ("text", "json"):
        raise ValueError(f"log_format must be 'text' or 'json', not {options.log_format!r}")
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        formatter: logging.Formatter
        if options.log_format == "json":
            formatter = JsonFormatter(options.worker_index)
        else:
            fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
            if options.worker_index is not None:
                fmt = f"%(asctime)s %(levelname)s w{options.worker_index} %(name)s: %(message)s"
            formatter = KeyValueFormatter(fmt)
        handler.setFormatter(formatter)
        root.addHandler(handler)
    logging.getLogger("ppio_sandbox").setLevel(options.log_level.upper())


def serve_workers(options: ServeOptions, argv: list[str]) -> int:
    """``serve --workers N``: the supervising parent (:mod:`.supervisor`); the exit code."""
    from .supervisor import Supervisor

    _setup_logging(options)
    # The workers' metrics snapshots, which outlive a worker (see .metrics).
    snapshots = options.data_dir / "metrics"
    shutil.rmtree(snapshots, ignore_errors=True)
    snapshots.mkdir(parents=True)
    keyring = KeyRing.load(options.api_keys, environ=options.environ, files=options.keys_files)
    bind = _bind_address(options, not keyring.empty)
    supervisor = Supervisor(
        argv,
        workers=options.workers,
        bind=bind,
        data_dir=options.data_dir,
        grace=options.grace,
        backlog=BACKLOG,
        clustered=bool(options.cluster),
    )
    return supervisor.run()


def serve_blocking(options: ServeOptions) -> int:
    """Run :func:`run` on the chosen worker until it stops; the exit code."""
    _setup_logging(options)
    if options.worker_index is not None:
        from .supervisor import become_worker

        become_worker()
    options = replace(options, tune_gc=True)  # this process is the orchestrator's own
    worker = options.worker
    if worker == "trio":
        anyio.run(run, options, backend="trio")
        return 0
    backend_options: dict[str, Any] = {}
    if worker in (None, "uvloop"):
        try:
            import uvloop  # noqa: F401
        except ImportError:
            if worker == "uvloop":
                raise SystemExit("--worker uvloop needs uvloop: pip install uvloop") from None
        else:
            backend_options["use_uvloop"] = True
    anyio.run(run, options, backend="asyncio", backend_options=backend_options)
    return 0
