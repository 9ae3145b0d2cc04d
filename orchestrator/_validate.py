"""Checks on values that come from callers, applied at the edge.

Every number a caller sends is range-checked before it reaches a clock, a
heap or a database: a JSON integer may have 400 digits and a msgpack float
may be NaN or infinite, and either would otherwise fail deep inside the
orchestrator (a 500) after a session had been half created.
"""

from __future__ import annotations

import math
import re

from ppio_sandbox.agent_runtime.errors import ValidationError

__all__ = ["MAX_TIMEOUT_SECONDS", "check_session_id", "check_timeout_seconds"]

MAX_TIMEOUT_SECONDS = 30 * 24 * 3600.0
"""The largest idle timeout a caller may ask for (30 days; sessions also end
at their maximum lifetime, 8 hours by default)."""

_SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def check_session_id(value: object) -> str:
    """A caller-chosen session id: 1-128 of ``A-Z a-z 0-9 . _ : -`` (it goes in URLs)."""
    if not isinstance(value, str) or not _SESSION_ID.fullmatch(value):
        raise ValidationError("session_id must be 1-128 characters of letters, digits and . _ : -")
    return value


def check_timeout_seconds(value: object, field: str = "timeout_seconds") -> float:
    """A finite number of seconds in ``(0, MAX_TIMEOUT_SECONDS]``, as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"{field} must be a number of seconds")
    # float(10**400) would raise OverflowError: a huge integer is simply too large.
    too_big = isinstance(value, int) and abs(value) > MAX_TIMEOUT_SECONDS
    seconds = math.inf if too_big else float(value)
    if not math.isfinite(seconds) or not 0 < seconds <= MAX_TIMEOUT_SECONDS:
        raise ValidationError(
            f"{field} must be a number of seconds greater than 0 and at most "
            f"{MAX_TIMEOUT_SECONDS:.0f} (30 days)"
        )
    return seconds
