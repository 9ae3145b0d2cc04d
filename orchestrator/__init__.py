"""The orchestrator: hosts many agents and many long-lived sessions on one machine.

Run it with ``ppio-sandbox-cli serve``; embed it with::

    async with Orchestrator(OrchestratorConfig(data_dir=Path("data"))) as host:
        template = await host.register_directory(Path("my-agent"), SHARED_TENANT)
        session = await host.create_session("default", template.id)

Parts: :mod:`.host` (templates, sandboxes, session actors and lifetimes),
:mod:`.session_core` (the sans-IO session state machine), :mod:`.actor` (the
actor task), :mod:`.sandbox` (in-process and process sandboxes),
:mod:`.templates` (the template store), :mod:`.auth`, :mod:`.metrics`, and
the HTTP front end (:mod:`.frontend`, :mod:`.hotpath`, :mod:`.api`,
:mod:`.server`).
"""

from .directory import InMemorySessionDirectory, SessionDirectory
from .host import SHARED_TENANT, Orchestrator, OrchestratorConfig
from .session_core import SessionLimits, SessionState, Strategy

__all__ = [
    "SHARED_TENANT",
    "InMemorySessionDirectory",
    "Orchestrator",
    "OrchestratorConfig",
    "SessionDirectory",
    "SessionLimits",
    "SessionState",
    "Strategy",
]
