"""A template whose agent file cannot be imported: its deploy must end ``failed``."""

from ppio_sandbox.agent_runtime import PPIOAgentRuntimeApp

app = PPIOAgentRuntimeApp()

raise RuntimeError("broken-at-import on purpose")
