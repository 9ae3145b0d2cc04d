"""Three agents with custom ``@app.ping`` handlers; pick one with ``--app``.

* ``busy_app``: the handler returns ``PingStatus.HEALTHY_BUSY``.
* ``string_app``: the handler returns the plain string ``"healthy"``.
* ``raising_app``: the handler raises.

Each entrypoint sleeps ``request["sleep"]`` seconds (default 0).
"""

from __future__ import annotations

from typing import Any

import anyio

from ppio_sandbox.agent_runtime import PingStatus, PPIOAgentRuntimeApp

busy_app = PPIOAgentRuntimeApp()
string_app = PPIOAgentRuntimeApp()
raising_app = PPIOAgentRuntimeApp()


async def _sleep_then_answer(request: dict[str, Any]) -> dict[str, Any]:
    await anyio.sleep(float(request.get("sleep", 0)))
    return {"ok": True}


for _app in (busy_app, string_app, raising_app):
    _app.entrypoint(_sleep_then_answer)


@busy_app.ping
async def always_busy() -> PingStatus:
    return PingStatus.HEALTHY_BUSY


@string_app.ping
def plain_string() -> str:
    return "healthy"


@raising_app.ping
async def broken() -> Any:
    raise RuntimeError("health check exploded")
