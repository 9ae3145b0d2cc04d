"""Sandboxes: where sessions' agent code runs (in process, or one process each)."""

from .base import Sandbox, SandboxProvider, TurnCall

__all__ = ["Sandbox", "SandboxProvider", "TurnCall"]
