"""Records every execution of a turn, so a test can tell whether it ran once.

The request names a ``ledger`` file and a ``token``: each execution appends
the token as one line before doing anything else. Then, as the request says:
``{"stream": n, "delay": s}`` streams ``n`` chunks ``{"token", "i"}`` a delay
apart; ``{"sleep": s}`` waits; ``{"fail": true}`` raises; otherwise the
reply is ``{"token": ...}``.
"""

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio

from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp

app = PPIOAgentRuntimeApp()


async def _chunks(token: str, count: int, delay: float) -> AsyncIterator[dict[str, Any]]:
    for i in range(count):
        yield {"token": token, "i": i}
        await anyio.sleep(delay)


@app.entrypoint
async def agent(request: dict[str, Any]) -> Any:
    token = str(request.get("token", ""))
    ledger = request.get("ledger")
    if ledger:
        with Path(ledger).open("a") as f:
            f.write(token + "\n")
    if request.get("fail"):
        raise RuntimeError(f"turn {token} failed on purpose")
    if "stream" in request:
        return _chunks(token, int(request["stream"]), float(request.get("delay", 0)))
    await anyio.sleep(float(request.get("sleep", 0)))
    return {"token": token}
