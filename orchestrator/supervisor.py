"""``serve --workers N``: N worker processes behind one address, and their parent.

The parent binds the address once per worker, each socket with
``SO_REUSEPORT`` (a Unix socket is shared), so the kernel spreads new
connections over the workers; every worker is a whole orchestrator with its
own event loop on its own core. The parent itself serves nothing (a Python
router in front would bring back the one-core ceiling): it holds the data
directory's lock, recovers it once, starts the workers, restarts one that
dies (in its slot, with its socket: connections waiting in that socket's
backlog are served by the new worker) and, on SIGTERM or SIGINT, passes the
signal on, waits for every worker to drain and exits 0. A second signal
kills the workers at once. Workers die with their parent
(``PR_SET_PDEATHSIG``), so none is ever left behind.

Worker ``i`` also listens on ``<data dir>/run/w<i>.sock``, where the others
forward the requests for the sessions it owns (:mod:`.placement`,
:mod:`.forwarding`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

__all__ = ["RESTART_BACKOFF_MAX", "Supervisor", "become_worker", "usable_cores"]

logger = logging.getLogger("ppio_sandbox.orchestrator.supervisor")

RESTART_BACKOFF_MAX = 10.0
"""A worker that keeps dying is restarted at most this often (seconds)."""
_STABLE_AFTER = 10.0  # a worker that lived this long starts the backoff afresh
_PR_SET_PDEATHSIG = 1


def usable_cores() -> int:
    """The CPUs this process may run on (``--workers auto``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def become_worker() -> None:
    """In a worker: die with the parent (SIGTERM: drain), even if it is SIGKILLed."""
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the parent's own cleanup must do
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _listen_sockets(bind: str, count: int, backlog: int) -> list[socket.socket]:
    """One listening socket per worker on ``bind`` (``host:port`` or ``unix:/path``)."""
    if bind.startswith("unix:"):
        path = bind[5:]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(backlog)
        return [sock] * count
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets = []
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, int(port)))
        sock.listen(backlog)
        sockets.append(sock)
    return sockets


class _Slot:
    def __init__(self, index: int, sock: socket.socket) -> None:
        self.index = index
        self.sock = sock
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.backoff = 0.5
        self.restart_at: float | None = None
        self.restarts = 0


class Supervisor:
    """Runs the workers; see the module docstring. ``run()`` returns the exit code."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        workers: int,
        bind: str,
        data_dir: Path,
        grace: float,
        backlog: int = 4096,
        clustered: bool = False,
    ) -> None:
        self.argv = list(argv)
        self.count = workers
        self.bind = bind
        self.data_dir = Path(data_dir)
        self.grace = grace
        self.backlog = backlog
        self.clustered = clustered
        self.token = os.environ.get("PPIO_CLUSTER_TOKEN") or secrets.token_urlsafe(24)
        self._signals: list[int] = []
        self._slots: list[_Slot] = []

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)

    def _spawn(self, slot: _Slot) -> None:
        argv = [
            sys.executable,
            "-m",
            "ppio_sandbox.orchestrator.cli",
            *self.argv,
            "--worker-index",
            str(slot.index),
            "--listen-fd",
            str(slot.sock.fileno()),
        ]
        env = dict(os.environ)
        if self.clustered is False:  # a cluster's nodes share etcd's token instead
            env["PPIO_CLUSTER_TOKEN"] = self.token
        # Its own process group: a Ctrl-C in the terminal reaches the parent only,
        # which then drains the workers once (a second signal would force them).
        slot.proc = subprocess.Popen(
            argv, pass_fds=(slot.sock.fileno(),), env=env, start_new_session=True
        )
        slot.started_at = time.monotonic()
        slot.restart_at = None
        logger.info("worker %d started (pid %d)", slot.index, slot.proc.pid)

    def _wait_ready(self, slot: _Slot, timeout: float) -> bool:
        """Until worker ``slot`` answers on its Unix socket (it has registered templates)."""
        path = self.data_dir / "run" / f"w{slot.index}.sock"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._signals:
            if slot.proc is None or slot.proc.poll() is not None:
                return False
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
                probe.settimeout(1.0)
                probe.connect(str(path))
                probe.sendall(b"GET /ping HTTP/1.1\r\nhost: w\r\nconnection: close\r\n\r\n")
                if probe.recv(16).startswith(b"HTTP/1.1 200"):
                    return True
            time.sleep(0.05)
        return False

    def run(self) -> int:
        from .templates import TemplateStore

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        # The parent owns the data directory (its lock) and recovers it once;
        # the workers share it.
        store = TemplateStore(self.data_dir)
        store._open_sync()
        (self.data_dir / "run").mkdir(parents=True, exist_ok=True)
        sockets = _listen_sockets(self.bind, self.count, self.backlog)
        self._slots = [_Slot(i, sock) for i, sock in enumerate(sockets)]
        logger.info("%d workers on %s (data in %s)", self.count, self.bind, self.data_dir)
        try:
            # Worker 0 first: it registers and smoke-tests the --template
            # directories, which the others then find deployed.
            self._spawn(self._slots[0])
            if not self._wait_ready(self._slots[0], 120.0) and not self._signals:
                logger.error("worker 0 did not become ready; stopping")
                self._signals.append(signal.SIGTERM)
            else:
                for slot in self._slots[1:]:
                    self._spawn(slot)
            return self._watch()
        finally:
            for sock in set(sockets):
                sock.close()
            store._close_sync()

    def _watch(self) -> int:
        while not self._signals:
            now = time.monotonic()
            for slot in self._slots:
                proc = slot.proc
                if proc is not None and proc.poll() is not None:
                    code = proc.returncode
                    slot.proc = None
                    lived = now - slot.started_at
                    slot.backoff = (
                        0.5 if lived > _STABLE_AFTER else min(slot.backoff * 2, RESTART_BACKOFF_MAX)
                    )
                    slot.restart_at = now + (0.0 if lived > _STABLE_AFTER else slot.backoff)
                    logger.warning(
                        "worker %d (pid %d) exited with %s after %.1f s; restarting it",
                        slot.index,
                        proc.pid,
                        code,
                        lived,
                    )
                if slot.proc is None and slot.restart_at is not None and now >= slot.restart_at:
                    slot.restarts += 1
                    self._spawn(slot)
            time.sleep(0.05)
        return self._stop()

    def _stop(self) -> int:
        first = self._signals[0]
        logger.info("%s: draining %d workers", signal.Signals(first).name, self.count)
        running = [slot.proc for slot in self._slots if slot.proc is not None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace + 20.0
        forced = False
        while any(proc.poll() is None for proc in running):
            if not forced and (len(self._signals) > 1 or time.monotonic() > deadline):
                logger.warning("stopping the workers now")
                for proc in running:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                forced = True
            time.sleep(0.05)
        codes = [proc.returncode for proc in running]
        logger.info("workers stopped (exit codes %s)", codes)
        # A worker still starting when the signal came dies of it (its handlers are
        # not installed yet): it held no session, so that is a clean stop too.
        clean = all(code in (0, -signal.SIGTERM) for code in codes)
        return 0 if clean and not forced else 1
