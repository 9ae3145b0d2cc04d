"""Test agent for the orchestrator end-to-end tests; ``action`` picks what it does.

``echo`` (default) answers with the prompt, the session, its pid and when the
turn ran (``time.monotonic()``, comparable across processes on Linux);
``sleep`` waits ``seconds`` first; ``fail`` raises; ``spawn`` starts a child
process that sleeps for two minutes with ``marker`` on its command line (only
meaningful in a process sandbox: it checks that closing a sandbox reaches
the processes the agent started).
"""

import os
import subprocess
import sys
import time

import anyio
import anyio.to_thread

from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp, RequestContext

app = PPIOAgentRuntimeApp()
_children: list[subprocess.Popen[bytes]] = []


def _start_child(marker: str) -> int:
    code = "import time; time.sleep(120)"
    child = subprocess.Popen([sys.executable, "-c", code, marker])
    _children.append(child)  # keep the handle: the test, not the agent, decides its end
    return child.pid


@app.entrypoint
async def agent(request: dict, context: RequestContext) -> dict:
    action = request.get("action", "echo")
    started = time.monotonic()
    if action == "sleep":
        await anyio.sleep(float(request["seconds"]))
    elif action == "fail":
        raise RuntimeError("the agent failed on purpose")
    elif action == "spawn":
        child_pid = await anyio.to_thread.run_sync(_start_child, request["marker"])
        return {"child_pid": child_pid, "pid": os.getpid()}
    return {
        "echo": request.get("prompt"),
        "session_id": context.session_id,
        "pid": os.getpid(),
        "started": started,
        "ended": time.monotonic(),
    }
