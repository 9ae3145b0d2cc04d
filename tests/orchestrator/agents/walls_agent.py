"""Process-sandbox test agent that tries to get out: ``{"op": ...}`` picks the attempt.

Each attempt reports what happened (``{"ok": False, "error": "PermissionError"}``)
instead of raising, so that a test can tell a wall that held from an agent
that broke. Uses anyio only, so it behaves the same on either backend.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Any

from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp, RequestContext

app = PPIOAgentRuntimeApp()


def attempt(action: Any) -> dict[str, Any]:
    try:
        value = action()
    except OSError as exc:
        return {"ok": False, "error": type(exc).__name__, "errno": exc.errno}
    return {"ok": True, "value": value}


def read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read(256).decode(errors="replace")


def write(path: str, text: str) -> int:
    with open(path, "w") as f:
        return f.write(text)


def whoami() -> dict[str, Any]:
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
    return {
        "uid": os.getuid(),
        "gid": os.getgid(),
        "groups": os.getgroups(),
        "pid": os.getpid(),
        "hostname": socket.gethostname(),
        "cwd": os.getcwd(),
        "root": sorted(os.listdir("/")),
        "processes": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "cap_eff": status["CapEff"].strip(),
        "cap_bnd": status["CapBnd"].strip(),
        "no_new_privs": status.get("NoNewPrivs", "").strip(),
    }


def spawn_many(count: int) -> dict[str, Any]:
    """Start up to ``count`` sleeping children; stop at the first failure; reap them all."""
    children: list[subprocess.Popen[bytes]] = []
    error = None
    try:
        for _ in range(count):
            children.append(subprocess.Popen(["sleep", "60"]))
    except OSError as exc:
        error = type(exc).__name__
    finally:
        for child in children:
            child.kill()
        for child in children:
            child.wait()
    return {"started": len(children), "error": error}


@app.entrypoint
async def agent(request: dict[str, Any], context: RequestContext) -> Any:
    op = request["op"]
    if op == "whoami":
        return whoami()
    if op == "read":
        return attempt(lambda: read(request["path"]))
    if op == "write":
        path, text = request["path"], request["text"]
        return attempt(lambda: write(path, text))
    if op == "listdir":
        return attempt(lambda: sorted(os.listdir(request["path"])))
    if op == "kill":
        return attempt(lambda: os.kill(int(request["pid"]), int(request.get("signal", 0))))
    if op == "connect":
        address = (request["host"], int(request["port"]))
        return attempt(lambda: socket.create_connection(address, timeout=2).close())
    if op == "spawn_many":
        return spawn_many(int(request["count"]))
    if op == "alloc":  # bytearray(n) zero-fills: every page is touched
        return len(bytearray(int(request["bytes"])))
    if op == "say_and_die":
        print(request["text"], flush=True)
        sys.stdout.flush()
        os._exit(int(request.get("code", 3)))
    if op == "echo":
        return {"echo": request, "session_id": context.session_id}
    raise ValueError(f"unknown op {op!r}")
