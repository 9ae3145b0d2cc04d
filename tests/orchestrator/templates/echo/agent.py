"""A test agent whose behaviour each request chooses with ``action``."""

import os
import time

import anyio

from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp, RequestContext

app = PPIOAgentRuntimeApp()


async def _stream(count: int, delay: float, context: RequestContext):
    try:
        for i in range(count):
            yield {"i": i}
            await anyio.sleep(delay)
    finally:
        context.state["stream_closed"] = context.state.get("stream_closed", 0) + 1


@app.entrypoint
async def agent(request: dict, context: RequestContext):
    state = context.state
    state["turns"] = state.get("turns", 0) + 1
    action = request.get("action", "echo")
    started = time.monotonic()
    if action == "sleep":
        await anyio.sleep(float(request.get("seconds", 1)))
    elif action == "fail":
        raise RuntimeError("the agent failed on purpose")
    elif action == "stream":
        return _stream(int(request.get("count", 5)), float(request.get("delay", 0.0)), context)
    elif action == "crash":
        os._exit(3)  # only meaningful in a process sandbox
    elif action == "env":
        return {"env": {k: os.environ.get(k) for k in request.get("keys", [])}}
    elif action == "unserializable":
        state["handle"] = object()  # msgpack cannot encode it: checkpoints must cope
    elif action == "forget":
        state.pop("handle", None)
    elif action == "state":
        return {"state": {k: v for k, v in state.items() if isinstance(v, (int, str))}}
    return {
        "turn": state["turns"],
        "echo": request.get("prompt"),
        "session_id": context.session_id,
        "started": started,
        "ended": time.monotonic(),
        "pid": os.getpid(),
    }
