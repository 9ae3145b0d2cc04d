"""A general-purpose test agent (anyio only, so it runs on asyncio and trio).

The request's ``mode`` picks the behaviour:

* ``echo`` (default): returns the request and what the context knew.
* ``sleep``: sleeps ``seconds`` (``anyio.sleep``), then answers.
* ``raise``: raises ``RuntimeError(message)``.
* ``raise_validation``: raises the runtime's ``ValidationError(message)``.
* ``raise_after_await``: awaits, then raises ``LookupError(message)``.
* ``own_scope``: sleeps under its own ``move_on_after(seconds)``.
* ``background``: starts an ``@app.async_task`` job of ``seconds`` that
  outlives the invocation, and answers at once (asyncio server only).
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio

from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp, RequestContext, ValidationError

app = PPIOAgentRuntimeApp()
_background: set[asyncio.Task[Any]] = set()


@app.async_task
async def background_job(seconds: float) -> None:
    await anyio.sleep(seconds)


@app.entrypoint
async def agent(request: dict[str, Any], context: RequestContext) -> Any:
    mode = request.get("mode", "echo")
    if mode == "sleep":
        seconds = float(request["seconds"])
        await anyio.sleep(seconds)
        return {"slept": seconds, "session_id": context.session_id}
    if mode == "raise":
        raise RuntimeError(request.get("message", "boom"))
    if mode == "raise_validation":
        raise ValidationError(request.get("message", "bad field"))
    if mode == "raise_after_await":
        await anyio.sleep(0.01)
        raise LookupError(request.get("message", "late failure"))
    if mode == "own_scope":
        # The agent's own deadline, opened before its first await.
        with anyio.move_on_after(float(request["seconds"])) as scope:
            await anyio.sleep(10)
        return {"cancelled_caught": scope.cancelled_caught}
    if mode == "background":
        task = asyncio.get_running_loop().create_task(background_job(float(request["seconds"])))
        _background.add(task)
        task.add_done_callback(_background.discard)
        return {"started": True}
    return {
        "request": request,
        "session_id": context.session_id,
        "request_id": context.request_id,
        "metadata": context.metadata,
    }
