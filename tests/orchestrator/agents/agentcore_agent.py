"""A bedrock-agentcore agent, exactly as AgentCore's docs write one.

``app.run()`` binds 127.0.0.1:8080 by itself; the process sandbox redirects
it to the address it chose (see ppio_sandbox.orchestrator.sandbox.process).
"""

from bedrock_agentcore import BedrockAgentCoreApp

app = BedrockAgentCoreApp()


@app.entrypoint
def invoke(payload):
    if payload.get("stream"):
        return (f"part {i}" for i in range(3))
    return {"echo": payload}


if __name__ == "__main__":
    app.run()
