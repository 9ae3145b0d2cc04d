"""Serving a runtime app: hypercorn by default, on asyncio (uvloop when
installed) or trio; uvicorn on request. This is the only module that knows
about event-loop backends.

Shutdown: the first SIGTERM or SIGINT stops accepting connections and lets
in-flight invocations finish for up to ``graceful_timeout`` seconds; a second
signal stops at once.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import signal
import stat
import sys
import threading
from typing import TYPE_CHECKING, Any

import anyio
import sniffio

from .config import AgentConfig

if TYPE_CHECKING:
    from .app import PPIOAgentRuntimeApp

__all__ = [
    "PPIOAgentRuntimeServer",
    "configure_logging",
    "hypercorn_config",
    "serve",
    "serve_forever",
]

logger = logging.getLogger("ppio_sandbox.agent_runtime")


class KeyValueFormatter(logging.Formatter):
    """``time level logger message key=value...`` with request and session ids."""

    _FIELDS = ("request_id", "session_id", "template_id")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        pairs = [
            f"{name}={value}"
            for name in self._FIELDS
            if (value := getattr(record, name, None)) is not None
        ]
        return f"{line} {' '.join(pairs)}" if pairs else line


def configure_logging(config: AgentConfig) -> None:
    """Set up logging for a runtime process, unless the host already did."""
    name = config.log_level or ("DEBUG" if config.debug else "INFO")
    level = getattr(logging, name.upper(), None)
    if not isinstance(level, int):
        raise ValueError(f"unknown log_level {config.log_level!r}")
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(KeyValueFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        # Logging is ours to set up: the agent's own loggers get the level too,
        # as logging.basicConfig(level=...) would do.
        root.setLevel(level)
    logging.getLogger("ppio_sandbox").setLevel(level)


def _prepare_unix_socket(bind: str) -> None:
    path = bind.removeprefix("unix:")
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)  # a stale socket left by a killed process
    except FileNotFoundError:
        pass


def hypercorn_config(config: AgentConfig) -> Any:
    from hypercorn.config import Config

    bind = config.resolve_bind()
    if bind.startswith("unix:"):
        _prepare_unix_socket(bind)
    hc = Config()
    hc.bind = [bind]
    hc.graceful_timeout = config.graceful_timeout
    hc.keep_alive_timeout = config.keep_alive_timeout
    hc.accesslog = None
    hc.errorlog = logging.getLogger("ppio_sandbox.agent_runtime.server")
    return hc


async def serve(
    app: PPIOAgentRuntimeApp,
    *,
    shutdown: anyio.Event | None = None,
    install_signal_handlers: bool = True,
    exit_on_second_signal: bool = False,
) -> None:
    """Serve ``app`` with hypercorn on the running anyio backend.

    Stops gracefully when ``shutdown`` is set or, with signal handlers, on
    SIGTERM/SIGINT.
    """
    config = app.config
    hc = hypercorn_config(config)
    shutdown = shutdown or anyio.Event()

    if sniffio.current_async_library() == "trio":
        from hypercorn.trio import serve as hypercorn_serve
    else:
        from hypercorn.asyncio import serve as hypercorn_serve  # type: ignore[assignment]

    forced = anyio.Event()
    async with anyio.create_task_group() as tg:

        async def run_server() -> None:
            # In a child task: hypercorn's asyncio TaskGroup cancels its
            # parent task on shutdown, which must not be the task owning `tg`.
            try:
                await hypercorn_serve(app, hc, shutdown_trigger=shutdown.wait)
            except Exception as exc:
                # hypercorn's asyncio worker raises InvalidStateError when its
                # graceful wait is cancelled: a forced stop, not a failure.
                if not forced.is_set():
                    raise
                logger.debug("hypercorn stopped by force: %r", exc)
            tg.cancel_scope.cancel()

        logger.info("agent runtime listening on %s", hc.bind[0])
        tg.start_soon(run_server)
        if install_signal_handlers:
            await _drain_on_signals(
                shutdown, forced, tg.cancel_scope, config.graceful_timeout, exit_on_second_signal
            )
    bind = hc.bind[0]
    if bind.startswith("unix:"):
        _prepare_unix_socket(bind)
    logger.info("agent runtime stopped")


async def _drain_on_signals(
    shutdown: anyio.Event,
    forced: anyio.Event,
    scope: anyio.CancelScope,
    grace: float,
    exit_now: bool,
) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if not shutdown.is_set():
                logger.info(
                    "%s received: draining in-flight invocations (up to %.0f s)",
                    signal.Signals(signum).name,
                    grace,
                )
                shutdown.set()
            else:
                logger.warning("second signal: stopping now")
                if exit_now:
                    # The process is ours (serve_forever): dropping the open
                    # connections at once is what a second signal asks for.
                    _hard_exit()
                forced.set()
                scope.cancel()


@functools.lru_cache(maxsize=2)
def pick_server(backend: str) -> str:
    """The faster server ``backend`` can have: uvicorn (with httptools) when installed
    and on asyncio, else hypercorn (the CLI's ``--server auto``)."""
    if backend != "asyncio":
        return "hypercorn"
    found = all(importlib.util.find_spec(name) is not None for name in ("uvicorn", "httptools"))
    return "uvicorn" if found else "hypercorn"


def serve_forever(app: PPIOAgentRuntimeApp) -> None:
    """Block serving ``app`` on the backend and server its config names."""
    config = app.config
    configure_logging(config)
    if app.entrypoint_handler is None:
        raise RuntimeError("no entrypoint registered: decorate your agent with @app.entrypoint")
    if config.server == "uvicorn":
        _serve_uvicorn(app)
        return
    if config.backend == "trio":
        anyio.run(functools.partial(serve, app, exit_on_second_signal=True), backend="trio")
    else:
        try:
            import uvloop  # noqa: F401
        except ImportError:
            options: dict[str, Any] = {}
        else:
            options = {"use_uvloop": True}
        anyio.run(
            functools.partial(serve, app, exit_on_second_signal=True),
            backend="asyncio",
            backend_options=options,
        )
    _exit_if_threads_linger()


def _exit_if_threads_linger() -> None:
    """Exit now if abandoned worker threads would keep the process alive.

    A sync entrypoint that timed out keeps running in its thread (a thread
    cannot be cancelled); the interpreter would wait for it at exit. The
    server has stopped and answered everyone, so nothing is lost by going.
    """
    stuck = [
        t
        for t in threading.enumerate()
        if t.is_alive() and not t.daemon and t is not threading.main_thread()
    ]
    if stuck:
        logger.warning("exiting with %d abandoned worker thread(s) still running", len(stuck))
        _hard_exit()


def _hard_exit() -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class PPIOAgentRuntimeServer:
    """The HTTP server of a :class:`PPIOAgentRuntimeApp`, as an object.

    ``PPIOAgentRuntimeServer(app).run()`` is ``app.run()``: it blocks, serving
    until SIGTERM or SIGINT, then drains. ``await server.serve()`` serves on
    the running event loop (asyncio or trio, hypercorn) until
    :meth:`shutdown`, or a signal when ``install_signal_handlers`` is on::

        server = PPIOAgentRuntimeServer(app, port=9000)
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve)
            ...
            server.shutdown()  # graceful: in-flight invocations finish

    The keyword arguments are ``app.run()``'s: ``port``, ``host``, ``bind``,
    ``backend`` and any :class:`AgentConfig` field; they change ``app.config``.
    """

    def __init__(
        self,
        app: PPIOAgentRuntimeApp,
        port: int | None = None,
        host: str | None = None,
        *,
        bind: str | None = None,
        backend: str | None = None,
        **overrides: Any,
    ) -> None:
        self.app = app
        config = app.config
        given = {"port": port, "host": host, "bind": bind, "backend": backend, **overrides}
        for key, value in given.items():
            if key in ("port", "host", "bind", "backend") and value is None:
                continue
            if not hasattr(config, key):
                raise TypeError(f"unknown server option {key!r}")
            setattr(config, key, value)
        config.__post_init__()
        self._shutdown: anyio.Event | None = None
        self._stop_requested = False

    @property
    def config(self) -> AgentConfig:
        """The app's configuration (where and how it is served)."""
        return self.app.config

    @property
    def bind(self) -> str:
        """Where it listens: ``host:port`` or ``unix:/path`` (``$PPIO_AGENT_BIND`` wins)."""
        return self.config.resolve_bind()

    def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then drain in-flight invocations and return."""
        serve_forever(self.app)

    async def serve(self, *, install_signal_handlers: bool = True) -> None:
        """Serve on the running anyio backend until :meth:`shutdown` or, with signal
        handlers (the default; main thread only), SIGTERM/SIGINT."""
        if self.app.entrypoint_handler is None:
            raise RuntimeError("no entrypoint registered: decorate your agent with @app.entrypoint")
        self._shutdown = anyio.Event()
        if self._stop_requested:
            self._shutdown.set()
        try:
            await serve(
                self.app,
                shutdown=self._shutdown,
                install_signal_handlers=install_signal_handlers,
            )
        finally:
            self._shutdown = None
            self._stop_requested = False

    def shutdown(self) -> None:
        """Stop accepting connections and let in-flight invocations finish (from the loop)."""
        self._stop_requested = True
        if self._shutdown is not None:
            self._shutdown.set()

    def __repr__(self) -> str:
        return f"PPIOAgentRuntimeServer(bind={self.bind!r}, server={self.config.server!r})"


def _serve_uvicorn(app: PPIOAgentRuntimeApp) -> None:
    try:
        import uvicorn
    except ImportError:
        raise RuntimeError(
            "server='uvicorn' needs uvicorn: pip install 'uvicorn[standard]'"
        ) from None
    config = app.config
    if config.backend != "asyncio":
        raise RuntimeError("uvicorn runs on asyncio only; use server='hypercorn' for trio")
    bind = config.resolve_bind()
    where: dict[str, Any]
    if bind.startswith("unix:"):
        _prepare_unix_socket(bind)
        where = {"uds": bind.removeprefix("unix:")}
    else:
        host, _, port = bind.rpartition(":")
        where = {"host": host.strip("[]"), "port": int(port)}
    uvicorn.run(
        app,
        **where,
        lifespan="on",
        access_log=False,
        log_level=(config.log_level or "info").lower(),
        timeout_graceful_shutdown=int(config.graceful_timeout),
        timeout_keep_alive=int(config.keep_alive_timeout),
    )
