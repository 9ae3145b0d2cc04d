# mypy: disable-error-code="import-not-found,untyped-decorator"
"""Benchmark agent: answers ``{"ok": true}`` at once (no I/O, no state)."""

from typing import Any

from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp, RequestContext

app = PPIOAgentRuntimeApp()

RESULT = {"ok": True}


@app.entrypoint
async def agent(request: dict[str, Any], context: RequestContext) -> dict[str, bool]:
    return RESULT
