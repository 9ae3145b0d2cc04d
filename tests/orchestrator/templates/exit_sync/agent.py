"""Issue 11 item 3: a sync entrypoint, middleware and ping handler (worker threads) that misbehave.

Same requests as exit_async: ``how``, ``middleware``, ``sleep``.
"""

import sys
import time

from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp

app = PPIOAgentRuntimeApp()


def misbehave(how: str) -> None:
    """Raise the BaseException named by ``how`` (nothing for an empty string)."""
    if how == "exit":
        sys.exit(3)
    if how == "exit_none":
        sys.exit()
    if how == "interrupt":
        raise KeyboardInterrupt("stop")
    if how == "generator_exit":
        raise GeneratorExit
    if how == "base":
        raise BaseException("plain")
    if how == "group":
        raise BaseExceptionGroup("two", [SystemExit(4), KeyboardInterrupt()])


@app.middleware
def guard(context, request):
    misbehave(request.get("middleware", ""))


@app.ping
def ping():
    sys.exit(9)


@app.entrypoint
def agent(request: dict) -> dict:
    time.sleep(float(request.get("sleep", 0)))
    misbehave(request.get("how", ""))
    return {"ok": True}
