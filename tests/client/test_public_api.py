"""The public surface: names, lazy re-exports, dependency direction, doctests."""

from __future__ import annotations

import doctest
import importlib
import subprocess
import sys

import pytest

import ppio_sandbox.client as client_pkg

MODULES = [
    "ppio_sandbox.client._auth",
    "ppio_sandbox.client._config",
    "ppio_sandbox.client._models",
    "ppio_sandbox.client._retry",
    "ppio_sandbox.agent_runtime.packaging",  # the archive format the client uploads
]


def test_every_public_name_resolves_and_the_runtime_re_exports_the_client() -> None:
    for name in client_pkg.__all__:
        assert getattr(client_pkg, name) is not None
    import ppio_sandbox.agent_runtime as runtime

    for name in ("AgentRuntimeClient", "AuthManager", "ClientConfig", "SandboxSession",
                 "SyncAgentRuntimeClient", "TemplateManager"):  # fmt: skip
        assert getattr(runtime, name) is getattr(client_pkg, name)


def test_the_client_never_imports_the_orchestrator() -> None:
    code = (
        "import sys, ppio_sandbox.client;"
        "bad = [m for m in sys.modules if m.startswith('ppio_sandbox.orchestrator')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module: str) -> None:
    mod = importlib.import_module(module)
    result = doctest.testmod(mod)
    assert result.failed == 0
    assert result.attempted > 0


def test_client_pool_takes_exactly_the_session_pool_settings() -> None:
    # AgentRuntimeClient.pool repeats SessionPool's keyword parameters on
    # purpose (its signature is what IDEs show); this keeps the two in step.
    import inspect

    from ppio_sandbox.client import AgentRuntimeClient, SessionPool

    factory = list(inspect.signature(AgentRuntimeClient.pool).parameters.values())
    constructor = list(inspect.signature(SessionPool.__init__).parameters.values())
    assert [p.name for p in factory[:2]] == ["self", "template_id"]
    assert [p.name for p in constructor[:3]] == ["self", "client", "template_id"]
    assert factory[2:] == constructor[3:]
    assert len(factory) > 2
