"""Issue 11 item 3: an async entrypoint, middleware and ping handler that misbehave.

``{"how": ...}`` makes the entrypoint raise a BaseException (see misbehave),
``{"middleware": ...}`` the middleware; ``{"sleep": s}`` sleeps (to check that
cancellation by the turn's timeout still works). The ping handler always calls
sys.exit(9): /ping must still answer.
"""

import sys

import anyio

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
async def guard(context, request):
    misbehave(request.get("middleware", ""))


@app.ping
async def ping():
    sys.exit(9)


@app.entrypoint
async def agent(request: dict) -> dict:
    await anyio.sleep(float(request.get("sleep", 0)))
    misbehave(request.get("how", ""))
    return {"ok": True}
