"""Benchmark harness for the agent runtime.

Run every scenario, or some of them, from the repository root::

    python -m benchmarks run [--scenario runtime-rps ...] [--quick] [--json out.json]
    python -m benchmarks list

Servers and load generators run in their own processes, bound to 127.0.0.1;
each subject is measured next to a baseline in the same run and reported as a
ratio to it, so that figures from different machines stay comparable.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ROOT"]

ROOT = Path(__file__).resolve().parent.parent
"""Repository root: the working directory of every process the harness starts."""
