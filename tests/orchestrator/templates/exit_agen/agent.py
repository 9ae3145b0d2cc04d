"""Issue 11 item 3: an async generator entrypoint that misbehaves after two chunks."""

import sys

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


@app.entrypoint
async def agent(request: dict):
    yield {"i": 0}
    yield {"i": 1}
    misbehave(request.get("how", ""))
