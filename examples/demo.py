"""`make demo`: start the example agents as real servers and talk to them.

Starts ``simple_agent.py`` and ``streaming_agent.py`` with
``python -m ppio_sandbox.agent_runtime`` on free loopback ports, invokes
them (a two-turn session and a streamed answer), prints what came back, and
stops both servers, whatever happens.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent / "agent_runtime"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_agent(name: str) -> Iterator[str]:
    """Run an example agent in a subprocess; yield its base URL; always stop it."""
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ppio_sandbox.agent_runtime",
            str(HERE / name),
            "--bind",
            f"127.0.0.1:{port}",
            "--log-level",
            "WARNING",
        ],
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        print(f"starting {name} on {url} ", end="", flush=True)
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"\n{name} exited with code {proc.returncode}")
            try:
                if httpx.get(url + "/ping", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"\n{name} did not become ready in 20 s")
            print(".", end="", flush=True)
            time.sleep(0.1)
        print(" ready")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    with serve_agent("simple_agent.py") as url, httpx.Client(base_url=url, timeout=30) as http:
        print("GET /ping ->", http.get("/ping").json())
        for query in ("hello", "how many turns so far?"):
            reply = http.post(
                "/invocations",
                json={"query": query},
                headers={"X-PPIO-Session-Id": "demo-session"},
            )
            reply.raise_for_status()
            body = reply.json()
            took = body["duration"] * 1000
            print(f"POST /invocations {query!r} -> {body['result']}  ({took:.2f} ms)")

    with serve_agent("streaming_agent.py") as url, httpx.Client(base_url=url, timeout=30) as http:
        print("streaming: ", end="", flush=True)
        started = time.monotonic()
        with http.stream("POST", "/invocations", json={"count": 5, "delay": 0.1}) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: ") and not line.startswith('data: {"request_id"'):
                    print(f"{line[6:]} (+{time.monotonic() - started:.2f}s) ", end="", flush=True)
        print("\ndemo finished: both agents stopped")


if __name__ == "__main__":
    main()
