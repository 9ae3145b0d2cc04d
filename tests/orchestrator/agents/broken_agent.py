"""Process-sandbox test agent that cannot even be imported."""

from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp

app = PPIOAgentRuntimeApp()

raise RuntimeError("broken on purpose at import time")
