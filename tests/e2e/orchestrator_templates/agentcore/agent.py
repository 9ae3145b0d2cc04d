"""A bedrock-agentcore agent, written the way AgentCore's docs write one.

``app.run()`` would bind 127.0.0.1:8080; the orchestrator's process sandbox
redirects it to the Unix socket it chose. The reply names the session the
agent saw and its pid, so the test can tell it really ran here.
"""

import os

from bedrock_agentcore import BedrockAgentCoreApp

app = BedrockAgentCoreApp()


@app.entrypoint
def invoke(payload, context):
    return {
        "answer": f"agentcore says: {payload.get('prompt', '')}",
        "session_id": context.session_id,
        "pid": os.getpid(),
    }


if __name__ == "__main__":
    app.run()
