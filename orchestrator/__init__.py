"""ppio_sandbox.orchestrator (a later issue builds it)."""
