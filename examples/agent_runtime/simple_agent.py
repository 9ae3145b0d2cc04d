"""The simplest agent: answers each request with one JSON value.

Run it:  python examples/agent_runtime/simple_agent.py
Call it: curl -s localhost:8080/invocations -H 'content-type: application/json' \
             -d '{"query": "hello"}'
"""

from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp, RequestContext

app = PPIOAgentRuntimeApp(debug=True)


@app.entrypoint
async def my_agent(request: dict, context: RequestContext) -> dict:
    query = request.get("query", "")

    # Your AI/ML logic here
    result = f"Processed: {query}"

    # context.state lives as long as the session (X-PPIO-Session-Id).
    turns = context.state["turns"] = context.state.get("turns", 0) + 1

    return {
        "response": result,
        "session_id": context.session_id,
        "timestamp": context.timestamp.isoformat(),
        "turn": turns,
    }


@app.ping
def health_check() -> dict:
    return {"status": "healthy", "service": "My Agent"}


if __name__ == "__main__":
    app.run(port=8080)
