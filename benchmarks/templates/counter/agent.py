# mypy: disable-error-code="import-not-found,untyped-decorator"
"""Benchmark agent for the scale-out scenarios: counts its turns in ``context.state``.

Like ``tests/e2e/orchestrator_templates/counter``, but its state stays the
same size however many turns run (the turn count and the last 8 tags), so
that a checkpoint costs the same at the end of a run as at its start.
Replies ``{"turn": n}``: after a failover, the first reply tells how many
acknowledged turns the session's new node brought back.
"""

from typing import Any

from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp, RequestContext

app = PPIOAgentRuntimeApp()

KEPT = 8


@app.entrypoint
async def agent(request: dict[str, Any], context: RequestContext) -> dict[str, int]:
    state = context.state
    turn = state["turns"] = state.get("turns", 0) + 1
    recent = state.setdefault("recent", [])
    recent.append(request.get("tag"))
    del recent[:-KEPT]
    return {"turn": turn}
