"""Shared by the scale-out scenarios (``scale-*``): orchestrators with
``--workers`` or ``--cluster``, their readiness, their ``/metrics``, and the
session ids a given worker owns.

Each scale-out scenario runs on one event loop: asyncio (uvloop) when
``--backend`` lists it, else the first one listed. What they measure --
worker processes, forwarding, etcd, checkpoints -- is the same on both
loops, and the long cases (10,000 sessions, failovers) would double.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import ROOT, agentgen, loadgen, procs
from ..core import RunConfig
from ..servers import (
    HELLO_TEMPLATE,
    ORCHESTRATOR,
    RunningServer,
    ServerError,
    ServerSpec,
    serve,
    unix_connection,
)

__all__ = [
    "COUNTER_TEMPLATE",
    "DEFAULT_TENANT",
    "THINK_TEMPLATE",
    "Node",
    "backend_for",
    "claim_session_ids",
    "cluster_spec",
    "metric_delta",
    "metric_total",
    "orchestrator_spec",
    "run_agentgen",
    "run_loadgen",
    "scrape_metrics",
    "serve_node",
    "session_ids",
    "write_ids",
]

THINK_TEMPLATE = ROOT / "benchmarks" / "templates" / "think"
COUNTER_TEMPLATE = ROOT / "benchmarks" / "templates" / "counter"
"""``bench-counter``: counts turns in ``context.state`` (bounded state), replies the count."""
DEFAULT_TENANT = "default"
"""The tenant of every request when the orchestrator has no API keys."""


def backend_for(config: RunConfig) -> str:
    """The one event loop a scale-out scenario runs on (see the module docstring)."""
    return "asyncio" if "asyncio" in config.backends else config.backends[0]


def orchestrator_spec(
    name: str, templates: Sequence[Path] = (HELLO_TEMPLATE,), extra: Sequence[str] = ()
) -> ServerSpec:
    """``ppio-sandbox-cli serve`` (the harness's usual options) with these templates
    and extra options (``--workers 2``, ``--durability turn``, ...)."""
    argv: list[str] = []
    skip = False
    for arg in ORCHESTRATOR.argv:  # drop the hello template, add ours
        if skip:
            skip = False
            continue
        if arg == "--template":
            skip = True
            continue
        argv.append(arg)
    for template in templates:
        argv += ["--template", str(template)]
    return dataclasses.replace(ORCHESTRATOR, name=name, argv=(*argv, *extra))


def cluster_spec(
    name: str,
    etcd_url: str,
    node_id: str,
    *,
    templates: Sequence[Path] = (HELLO_TEMPLATE,),
    durability: str = "interval",
    lease_ttl: float = 5.0,
) -> ServerSpec:
    """A node of an etcd cluster, on its own port (``--advertise`` defaults to it)."""
    extra = ["--cluster", etcd_url, "--node-id", node_id, "--lease-ttl", f"{lease_ttl:g}"]
    extra += ["--durability", durability]
    return orchestrator_spec(name, templates, extra)


def _workers_of(spec: ServerSpec) -> int:
    argv = list(spec.argv)
    if "--workers" in argv:
        return int(argv[argv.index("--workers") + 1])
    return 1


@dataclass(frozen=True)
class Node:
    """A ready orchestrator: its server, and with ``--workers`` its worker sockets."""

    server: RunningServer
    workers: int

    @property
    def pid(self) -> int:
        return self.server.pid

    @property
    def port(self) -> int:
        return self.server.port

    def socket(self, index: int) -> Path:
        """Worker ``index``'s Unix socket (``<data dir>/run/w<i>.sock``)."""
        assert self.server.data is not None
        return self.server.data / "run" / f"w{index}.sock"


def _pings(path: Path) -> bool:
    conn = unix_connection(path, timeout=1.0)
    try:
        conn.request("GET", "/ping")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


@contextlib.contextmanager
def serve_node(
    spec: ServerSpec,
    backend: str,
    config: RunConfig,
    cpus: frozenset[int] | None,
) -> Iterator[Node]:
    """:func:`~benchmarks.servers.serve`, then, with ``--workers N``, until every
    worker answers ``/ping`` on its own socket (the TCP port answers as soon as
    the first worker does)."""
    with serve(
        spec,
        backend,
        cpus=cpus,
        logdir=config.workdir,
        startup_timeout=config.startup_timeout,
        stop_timeout=config.stop_timeout,
    ) as server:
        node = Node(server, _workers_of(spec))
        if node.workers > 1:
            deadline = time.monotonic() + config.startup_timeout
            for index in range(node.workers):
                while not _pings(node.socket(index)):
                    if time.monotonic() > deadline:
                        raise ServerError(
                            f"{spec.name}: worker {index} not ready after "
                            f"{config.startup_timeout:g} s\n{procs.tail(server.log)}"
                        )
                    time.sleep(0.05)
        yield node


def session_ids(count: int, prefix: str) -> list[str]:
    """``count`` caller-chosen session ids."""
    return [f"{prefix}{index}" for index in range(count)]


def claim_session_ids(
    socket: Path, template: str, ids: Sequence[str], timeout: float = 10.0
) -> None:
    """Make the worker listening on ``socket`` own each of ``ids``.

    Among the workers of a machine a caller-named session belongs to the
    worker that first uses the name, so each session is created through that
    worker's own socket (``POST /v1/sessions`` with its ``session_id``).
    """
    conn = unix_connection(socket, timeout)
    try:
        for sid in ids:
            body = json.dumps({"template_id": template, "session_id": sid})
            conn.request("POST", "/v1/sessions", body, {"content-type": "application/json"})
            reply = conn.getresponse()
            text = reply.read()
            if reply.status not in (201, 400):  # 400: it exists (an earlier repetition)
                raise RuntimeError(f"claiming session {sid}: {reply.status} {text[:200]!r}")
    finally:
        conn.close()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def scrape_metrics(address: int | Path, timeout: float = 10.0) -> dict[str, float]:
    """``GET /metrics`` on a TCP port or a Unix socket: ``{"name{labels}": value}``
    (``{}`` when it does not answer). On ``--workers``, the sum over the workers."""
    conn: http.client.HTTPConnection
    if isinstance(address, Path):
        conn = unix_connection(address, timeout)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", address, timeout=timeout)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        text = response.read().decode("utf-8", "replace")
        if response.status != 200:
            return {}
    except (OSError, http.client.HTTPException):
        return {}
    finally:
        conn.close()
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            try:
                out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
            except ValueError:
                continue
    return out


def metric_total(metrics: dict[str, float], name: str, label: str | None = None) -> float:
    """The sum of ``name``'s samples (only those whose labels contain ``label``)."""
    total = 0.0
    for key, value in metrics.items():
        base, _, labels = key.partition("{")
        if base == name and (label is None or label in labels):
            total += value
    return total


def metric_delta(
    before: dict[str, float], after: dict[str, float], name: str, label: str | None = None
) -> float:
    """How much ``name`` (with ``label``) grew between two scrapes."""
    return metric_total(after, name, label) - metric_total(before, name, label)


def run_loadgen(
    opts: loadgen.Options, cpus: frozenset[int] | None, extra_timeout: float = 30.0
) -> dict[str, Any]:
    """One load-generator process, to completion: its JSON result."""
    timeout = opts.warmup + opts.duration + extra_timeout
    result: dict[str, Any] = procs.run_json(loadgen.command(opts), cpus=cpus, timeout=timeout)
    return result


def run_agentgen(opts: agentgen.AgentOptions, cpus: frozenset[int] | None) -> dict[str, Any]:
    """One agent-hosting load generator, to completion: its JSON result."""
    timeout = 2 * opts.ramp_timeout + opts.warmup + opts.duration + 60.0
    result: dict[str, Any] = procs.run_json(agentgen.command(opts), cpus=cpus, timeout=timeout)
    return result


def write_ids(workdir: Path, name: str, ids: Sequence[str]) -> Path:
    """A ``--session-ids`` file in the run's work directory."""
    path = workdir / f"{name}.ids"
    path.write_text("".join(f"{sid}\n" for sid in ids))
    return path
