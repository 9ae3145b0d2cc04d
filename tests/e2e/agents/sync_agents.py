"""Sync entrypoints; pick one with ``--app``.

* ``dict_app``: ``def agent(request, context)`` returning a dict, after
  blocking ``request["sleep"]`` seconds (default 0).
* ``gen_app``: a sync generator that blocks (``time.sleep``) between chunks
  and reports the thread it runs on; its ``finally`` writes the number of
  chunks produced to ``request["marker"]`` when given.
* ``one_param_app``: ``def agent(request)``, one parameter.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp, RequestContext

dict_app = PPIOAgentRuntimeApp()
gen_app = PPIOAgentRuntimeApp()
one_param_app = PPIOAgentRuntimeApp()


@dict_app.entrypoint
def sync_dict(request: dict[str, Any], context: RequestContext) -> dict[str, Any]:
    time.sleep(float(request.get("sleep", 0)))
    return {
        "echo": request.get("prompt"),
        "session_id": context.session_id,
        "main_thread": threading.current_thread() is threading.main_thread(),
    }


@gen_app.entrypoint
def sync_gen(request: dict[str, Any]) -> Iterator[dict[str, Any]]:
    delay = float(request.get("delay", 0))
    produced = 0
    try:
        for i in range(int(request.get("count", 3))):
            time.sleep(delay)
            produced += 1
            yield {"n": i + 1, "main_thread": threading.current_thread() is threading.main_thread()}
    finally:
        if "marker" in request:
            Path(request["marker"]).write_text(str(produced))


@one_param_app.entrypoint
def one_param(request):  # type: ignore[no-untyped-def]
    return {"keys": sorted(request), "prompt": request.get("prompt")}
