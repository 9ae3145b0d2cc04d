"""ppio_sandbox.client (a later issue builds it)."""
