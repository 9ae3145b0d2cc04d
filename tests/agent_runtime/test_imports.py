"""Code inside a sandbox stays light: the runtime imports no client or orchestrator."""

from __future__ import annotations

import subprocess
import sys


def test_runtime_import_pulls_in_no_httpx_quart_or_orchestrator() -> None:
    code = (
        "import sys, ppio_sandbox.agent_runtime as rt\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('httpx', 'quart')"
        " or m.startswith(('ppio_sandbox.orchestrator', 'ppio_sandbox.client')))\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_seed_imports_work_as_written() -> None:
    from ppio_sandbox.agent_runtime import (  # noqa: F401
        AgentConfig,
        AuthenticationError,
        InvocationError,
        InvocationRequest,
        PPIOAgentRuntimeApp,
        PPIOAgentRuntimeError,
        RequestContext,
        SessionNotFoundError,
        TemplateNotFoundError,
        ValidationError,
    )
