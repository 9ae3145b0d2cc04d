"""A stream that never ends and never awaits between yields.

Only the runtime can stop it (when the client disconnects); its ``finally``
writes ``request["marker"]`` so a test can see that it was closed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp

app = PPIOAgentRuntimeApp()


@app.entrypoint
async def endless(request: dict[str, Any]) -> AsyncIterator[int]:
    produced = 0
    try:
        while True:  # yield-only: no await between chunks
            produced += 1
            yield produced
    finally:
        # Synchronous on purpose: no await (a cancellation point) in the cleanup.
        Path(request["marker"]).write_text(str(produced))
