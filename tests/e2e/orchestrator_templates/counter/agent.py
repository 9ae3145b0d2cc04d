"""Counts its turns in ``context.state``: what the scale-out tests check survives.

Each reply carries the turn number, the process that ran it and the ids;
``sleep`` waits first (a turn to kill a node under); ``stream`` yields the
turn number ``count`` times.
"""

import os

import anyio

from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp, RequestContext

app = PPIOAgentRuntimeApp()


async def _stream(turn: int, count: int, delay: float):
    for i in range(count):
        yield {"turn": turn, "i": i}
        await anyio.sleep(delay)


@app.entrypoint
async def agent(request: dict, context: RequestContext):
    state = context.state
    turn = state["turns"] = state.get("turns", 0) + 1
    state.setdefault("history", []).append(request.get("tag"))
    if request.get("action") == "sleep":
        await anyio.sleep(float(request.get("seconds", 1.0)))
    if request.get("action") == "stream":
        return _stream(turn, int(request.get("count", 3)), float(request.get("delay", 0.0)))
    return {
        "turn": turn,
        "tag": request.get("tag"),
        "history": len(state["history"]),
        "pid": os.getpid(),
        "session_id": context.session_id,
    }
