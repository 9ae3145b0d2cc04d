"""The shipped peer runtimes, each in its own throw-away virtual environment.

``ppio-sandbox`` 2.1.0 owns the same ``ppio_sandbox`` import name as this
project, so each peer is installed from the package registry into a virtual
environment of its own, cached outside the repository (``$PPIO_BENCH_CACHE``,
else ``~/.cache/ppio-bench``, then ``peers/<name>-<version>``), created on
first use with a progress message. A peer whose environment cannot be made
(no network, no wheel) is skipped with a one-line reason; the run goes on.

The agents are the files beside this module, run by the peer's Python and
served the way the peer ships (``app.run``: uvicorn with its defaults,
bound to 127.0.0.1 and a free port). :data:`HOSTING_PEERS` (Ray) host the
``agent-hosting`` workload their own way instead (``peer-hosting``: actors
on a Ray head, driven through Ray's API by ``ray_agent.py``)::

    python -m benchmarks.peers            # create (or check) every peer's venv
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..servers import ServerSpec

__all__ = [
    "HOSTING_PEERS",
    "PEERS",
    "RAY",
    "Peer",
    "PeerEnv",
    "available",
    "cache_dir",
    "ensure",
    "main",
]

HERE = Path(__file__).resolve().parent

MARKER = "ppio-bench-peer.json"
"""Written last into a finished environment: what was installed, which versions."""

INSTALL_TIMEOUT = 600.0
"""Seconds for creating one environment (venv + pip install) before giving up."""

_REPORTED = ("uvicorn", "starlette", "uvloop", "httptools", "h11", "pydantic")
"""Distributions whose versions are recorded next to the peer's own."""


@dataclass(frozen=True)
class Peer:
    """A peer runtime: what to install and which agent file serves it."""

    label: str
    """Subject label in the tables, e.g. ``ppio-sandbox-2.1.0``."""
    distribution: str
    version: str
    module: str
    """Imported to check the environment works."""
    agent: Path
    description: str

    @property
    def requirement(self) -> str:
        """``name==version`` for pip."""
        return f"{self.distribution}=={self.version}"

    @property
    def key(self) -> str:
        """The environment's directory name."""
        return f"{self.distribution}-{self.version}"


PEERS = (
    Peer(
        label="ppio-sandbox-2.1.0",
        distribution="ppio-sandbox",
        version="2.1.0",
        module="ppio_sandbox.agent_runtime",
        agent=HERE / "ppio_sandbox_agent.py",
        description="ppio-sandbox 2.1.0 AgentRuntimeApp (Starlette on uvicorn.run, as shipped)",
    ),
    Peer(
        label="bedrock-agentcore-1.25.0",
        distribution="bedrock-agentcore",
        version="1.25.0",
        module="bedrock_agentcore.runtime",
        agent=HERE / "bedrock_agentcore_agent.py",
        description="bedrock-agentcore 1.25.0 BedrockAgentCoreApp (uvicorn.run, as shipped)",
    ),
)
"""The peers, in the order they are measured."""

RAY = Peer(
    label="ray-2.60.0",
    distribution="ray",
    version="2.60.0",
    module="ray",
    agent=HERE / "ray_agent.py",
    description="ray 2.60.0 (minimal install): async actors each holding many sessions, "
    "a turn a streaming-generator actor call, driven through Ray's Python API",
)
"""Ray: the ``peer-hosting`` scenario's peer (not an HTTP agent server: see
:mod:`benchmarks.scenarios.peer_hosting`)."""

HOSTING_PEERS = (RAY,)
"""Peers hosting the ``agent-hosting`` workload (``peer-hosting``)."""


@dataclass(frozen=True)
class PeerEnv:
    """A ready environment for ``peer``."""

    peer: Peer
    path: Path
    versions: dict[str, str]
    """Installed versions: the peer's distribution and its server stack."""

    @property
    def python(self) -> Path:
        """The environment's interpreter."""
        return self.path / "bin" / "python"

    def spec(self, *, stream: bool = False) -> ServerSpec:
        """The peer's agent as a server (``{bind}`` filled in at start)."""
        argv = (str(self.python), str(self.peer.agent), "--bind", "{bind}")
        return ServerSpec(
            name=self.peer.label, argv=argv + (("--stream",) if stream else ()), ready_path="/ping"
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready description."""
        return {
            "label": self.peer.label,
            "requirement": self.peer.requirement,
            "venv": str(self.path),
            "versions": self.versions,
            "served": self.peer.description,
        }


def cache_dir() -> Path:
    """Where peer environments live: ``$PPIO_BENCH_CACHE/peers``, else
    ``~/.cache/ppio-bench/peers`` (``$XDG_CACHE_HOME`` honoured)."""
    base = os.environ.get("PPIO_BENCH_CACHE")
    if base:
        return Path(base) / "peers"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ppio-bench" / "peers"


_FAILED: dict[str, str] = {}
"""Peers that could not be installed in this process: not tried twice per run."""

_PROBE = """
import importlib, json, sys
from importlib.metadata import PackageNotFoundError, version
importlib.import_module(sys.argv[1])
found = {}
for name in sys.argv[2:]:
    try:
        found[name] = version(name)
    except PackageNotFoundError:
        pass
print(json.dumps(found))
"""


def _read_marker(path: Path, peer: Peer) -> PeerEnv | None:
    try:
        data = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if data.get("requirement") != peer.requirement or not (path / "bin" / "python").exists():
        return None
    return PeerEnv(peer, path, dict(data.get("versions", {})))


def _run(argv: list[str], timeout: float) -> str:
    """Run a setup command; its stdout, or RuntimeError with the tail of its output."""
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{' '.join(argv[:4])} ... timed out after {timeout:.0f} s") from None
    if done.returncode != 0:
        lines = [
            line
            for line in (done.stderr or done.stdout).splitlines()
            if line.strip() and not line.startswith("WARNING: Location")
        ]
        tail = lines[-1] if lines else f"exit code {done.returncode}"
        raise RuntimeError(tail.strip())
    return done.stdout


def _create(peer: Peer, path: Path) -> PeerEnv:
    if path.exists():
        shutil.rmtree(path)  # an unfinished environment from an interrupted run
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + INSTALL_TIMEOUT
    try:
        _run([sys.executable, "-m", "venv", str(path)], INSTALL_TIMEOUT)
        python = str(path / "bin" / "python")
        pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        pip += ["--timeout", "20", "--retries", "1", peer.requirement]
        _run(pip, max(1.0, deadline - time.monotonic()))
        probe = [python, "-c", _PROBE, peer.module, peer.distribution, *_REPORTED]
        versions = json.loads(_run(probe, 60.0))
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    marker = {"requirement": peer.requirement, "versions": versions, "created": time.time()}
    (path / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return PeerEnv(peer, path, versions)


def ensure(peer: Peer, note: Callable[[str], None]) -> PeerEnv | str:
    """The peer's ready environment, created on first use; or why it is unavailable.

    ``note`` receives progress lines (creation can take a minute).
    """
    if peer.key in _FAILED:
        return _FAILED[peer.key]
    path = cache_dir() / peer.key
    env = _read_marker(path, peer)
    if env is not None:
        return env
    note(f"creating a virtual environment for {peer.requirement} in {path} (first use) ...")
    started = time.monotonic()
    try:
        env = _create(peer, path)
    except (OSError, RuntimeError, ValueError) as exc:
        reason = f"{peer.label} skipped: cannot install {peer.requirement} ({exc})"
        _FAILED[peer.key] = reason
        note(reason)
        return reason
    note(f"{peer.requirement} ready in {time.monotonic() - started:.0f} s")
    return env


def available(note: Callable[[str], None]) -> tuple[list[PeerEnv], dict[str, str]]:
    """Every peer's environment that could be made; why the others are skipped
    (label -> one line)."""
    envs: list[PeerEnv] = []
    skipped: dict[str, str] = {}
    for peer in PEERS:
        found = ensure(peer, note)
        if isinstance(found, str):
            skipped[peer.label] = found
        else:
            envs.append(found)
    return envs, skipped


def main() -> int:
    """Create or check every peer's environment; print what is there."""
    note = lambda line: print(line, file=sys.stderr)  # noqa: E731
    envs, skipped = available(note)
    for peer in HOSTING_PEERS:
        found = ensure(peer, note)
        if isinstance(found, str):
            skipped[peer.label] = found
        else:
            envs.append(found)
    for env in envs:
        print(json.dumps(env.to_json()))
    for line in skipped.values():
        print(line)
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
