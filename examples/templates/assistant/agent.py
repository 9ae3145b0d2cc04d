"""A small multi-turn assistant: remembers the conversation, streams on request.

The "model" is simulated (a short sleep per answer), so the example runs
anywhere; replace ``think`` with a call to your LLM.
"""

import anyio

from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp, RequestContext

app = PPIOAgentRuntimeApp()


async def think(history: list[str], prompt: str) -> str:
    await anyio.sleep(0.02)  # stands in for a model call
    before = history[-1] if history else "nothing"
    return f"({len(history) + 1}) you said {prompt!r}; before that: {before!r}"


@app.entrypoint
async def assistant(request: dict, context: RequestContext):
    history: list[str] = context.state.setdefault("history", [])
    prompt = str(request.get("prompt", ""))
    answer = await think(history, prompt)
    history.append(prompt)
    if request.get("stream"):
        return _words(answer)
    return {"answer": answer, "turn": len(history)}


async def _words(text: str):
    for word in text.split():
        yield word
        await anyio.sleep(0.01)
