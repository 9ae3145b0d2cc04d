"""Test agent that calls ``sys.exit()`` (and raises other BaseExceptions) on request.

``how`` makes the entrypoint raise (see ``misbehave``); ``stream`` and
``sync_stream`` stream two chunks first, from an async or a sync generator
(the latter iterated in a worker thread), then raise. ``app`` has no
middleware, so its coroutine is started eagerly; ``app_mw`` has one that
misbehaves on ``middleware``. Both ping handlers call ``sys.exit(9)``.
"""

import sys

from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp


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


async def _chunks(how: str):
    yield {"i": 0}
    yield {"i": 1}
    misbehave(how)


def _sync_chunks(how: str):
    yield {"i": 0}
    yield {"i": 1}
    misbehave(how)


async def agent(request: dict):
    if "stream" in request:
        return _chunks(request["stream"])
    if "sync_stream" in request:
        return _sync_chunks(request["sync_stream"])
    misbehave(request.get("how", ""))
    return {"ok": True}


async def guard(context, request):
    misbehave(request.get("middleware", ""))


def ping():
    sys.exit(9)


app = PPIOAgentRuntimeApp()
app.entrypoint(agent)
app.ping(ping)

app_mw = PPIOAgentRuntimeApp()
app_mw.entrypoint(agent)
app_mw.middleware(guard)
app_mw.ping(ping)
