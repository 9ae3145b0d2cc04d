"""What a newcomer asks the command lines: their version, their defaults, the keys file.

``ppio-sandbox-cli --version`` and ``python -m ppio_sandbox.agent_runtime
--version`` print the installed distribution's version; ``serve --help`` names
the default of every option that has one and documents the ``--keys-file``
format, which a file written that way then satisfies. The installed scripts
run in subprocesses, as a shell would run them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from ppio_sandbox.orchestrator.auth import KeyRing
from ppio_sandbox.orchestrator.cli import build_parser

SCRIPT = Path(sys.executable).with_name("ppio-sandbox-cli")
VERSION = metadata.version("ppio-agent-runtime")


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPIO_")}
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=60, check=False, env={**env, "COLUMNS": "100"}
    )


@pytest.mark.parametrize(
    ("argv", "prog"),
    [
        ((str(SCRIPT), "--version"), "ppio-sandbox-cli"),
        (
            (sys.executable, "-m", "ppio_sandbox.agent_runtime", "--version"),
            "python -m ppio_sandbox.agent_runtime",
        ),
    ],
    ids=["ppio-sandbox-cli", "agent_runtime"],
)
def test_version_is_the_installed_distributions(argv: tuple[str, ...], prog: str) -> None:
    done = run(*argv)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{prog} {VERSION}\n", "")


def test_the_package_version_is_the_distributions() -> None:
    import ppio_sandbox.agent_runtime as runtime

    assert runtime.__version__ == VERSION


def _serve_parser() -> argparse.ArgumentParser:
    parser = build_parser(["serve"])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def test_serve_help_names_every_default() -> None:
    undocumented = []
    for action in _serve_parser()._actions:
        if action.help in (None, argparse.SUPPRESS) or not action.option_strings:
            continue
        if action.default in (None, [], False, argparse.SUPPRESS):
            continue  # no default to show: the option is off or absent unless given
        if "default" not in action.help.lower():
            undocumented.append(f"{action.option_strings[0]} (default {action.default!r})")
    assert not undocumented, f"serve options whose help hides their default: {undocumented}"


def test_serve_help_shows_the_defaults_that_were_hidden() -> None:
    done = run(str(SCRIPT), "serve", "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # argparse wraps the help texts
    assert "(default .ppio-orchestrator, in the current directory)" in text
    assert "on SIGTERM (default 30)" in text
    assert "(default: each template's spec.sandbox.warm_pool, 0 unless it says)" in text
    assert "one [TENANT:]KEY_ID:SECRET per line" in text
    assert '{"keys": [{"tenant": ..., "key_id": ..., "secret": ...}]}' in text
    assert '(the tenant is optional, "default" by default)' in text


def test_a_keys_file_written_as_the_help_says_is_accepted(tmp_path: Path) -> None:
    lines = tmp_path / "keys.txt"
    lines.write_text("# rotated monthly\nacme:k1:s3cret-one\n\nk2:s3cret-two\n")
    ring = KeyRing.load(environ={}, files=[lines])
    assert {(k.tenant, k.key_id) for k in ring} == {("acme", "k1"), ("default", "k2")}

    as_json = tmp_path / "keys.json"
    as_json.write_text(
        '{"keys": [{"tenant": "acme", "key_id": "k3", "secret": "s3"},'
        ' {"key_id": "k4", "secret": "s4"}]}'
    )
    ring = KeyRing.load(environ={}, files=[as_json])
    assert {(k.tenant, k.key_id) for k in ring} == {("acme", "k3"), ("default", "k4")}
