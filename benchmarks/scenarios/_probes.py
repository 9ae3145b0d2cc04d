"""Shared by the in-process scenarios: run one ``benchmarks.inproc`` probe."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from .. import procs
from ..core import RunConfig

__all__ = ["probe_command", "run_probe"]


def probe_command(args: Sequence[str], config: RunConfig) -> list[str]:
    """``python -m benchmarks.inproc ARGS --workdir <run's temporary directory>``."""
    return [sys.executable, "-m", "benchmarks.inproc", *args, "--workdir", str(config.workdir)]


def run_probe(
    args: Sequence[str], config: RunConfig, *, cpus: frozenset[int] | None, timeout: float
) -> dict[str, Any]:
    """Run a probe in a fresh process (pinned to ``cpus``); its JSON result."""
    result: dict[str, Any] = procs.run_json(probe_command(args, config), cpus=cpus, timeout=timeout)
    return result
