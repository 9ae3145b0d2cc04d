"""Scenario registry: each module here registers one :class:`Scenario`.

A new scenario is a module with an object that has ``name``,
``description``, ``steps(config)`` (how many progress steps it will take)
and ``run(config, progress)``; it calls :func:`register` at import and is
listed in :data:`MODULES`.
"""

from __future__ import annotations

import importlib
from typing import Protocol

from ..core import Progress, RunConfig, ScenarioResult

__all__ = ["MODULES", "Scenario", "all_scenarios", "get", "register"]

MODULES = (
    "runtime_rps",
    "runtime_stream",
    "orchestrator_rps",
    "session_churn",
    "idle_sessions",
    "process_sandbox",
    "orchestrator_process",
    "agent_hosting",
    "peer_hosting",
    "client_overhead",
    "scale_workers",
    "scale_forwarding",
    "scale_creation",
    "scale_failover",
    "scale_checkpoints",
)
"""Scenario modules, in the order ``run`` without ``--scenario`` runs them."""

_REGISTRY: dict[str, Scenario] = {}


class Scenario(Protocol):
    """What the harness needs from a scenario."""

    name: str
    description: str

    def steps(self, config: RunConfig) -> int:
        """How many progress steps :meth:`run` will announce."""
        ...

    def run(self, config: RunConfig, progress: Progress) -> ScenarioResult:
        """Measure; announce each step on ``progress``."""
        ...


def register(scenario: Scenario) -> Scenario:
    """Add ``scenario`` to the registry (at import of its module)."""
    if scenario.name in _REGISTRY:
        raise ValueError(f"scenario {scenario.name!r} registered twice")
    _REGISTRY[scenario.name] = scenario
    return scenario


def _load() -> None:
    for module in MODULES:
        importlib.import_module(f"{__name__}.{module}")


def all_scenarios() -> dict[str, Scenario]:
    """Every registered scenario by name, in :data:`MODULES` order."""
    _load()
    return dict(_REGISTRY)


def get(name: str) -> Scenario:
    """The scenario called ``name``; ``KeyError`` lists the known ones."""
    scenarios = all_scenarios()
    try:
        return scenarios[name]
    except KeyError:
        raise KeyError(f"unknown scenario {name!r}; known: {', '.join(scenarios)}") from None
