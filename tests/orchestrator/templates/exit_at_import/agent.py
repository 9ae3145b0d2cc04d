"""Issue 11 item 3: an agent that calls sys.exit(3) while it is imported."""

import sys

from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp

app = PPIOAgentRuntimeApp()


@app.entrypoint
async def agent(request: dict) -> dict:
    return {"ok": True}


sys.exit(3)
