"""``scale-creation``: session creations per second in an etcd cluster vs one node.

A real 3-member etcd on loopback (:mod:`benchmarks.etcd`), started once for
the scenario. Subjects, each on fresh servers per repetition:

* ``single`` (the baseline): one ``ppio-sandbox-cli serve``, no cluster;
* ``cluster-1``, ``cluster-2``, ``cluster-3``: that many ``serve --cluster``
  nodes on the etcd (``cluster-2`` only with ``--quick``), the load
  generator's connections spread over them (connection ``i`` on node
  ``i mod k``).

On each, :mod:`benchmarks.loadgen` ``--create`` loops ``POST /v1/sessions``
on every keep-alive connection (64, 4 with ``--quick``), twice:

* ``generated``: ``{"template_id": "bench-hello"}``, the node names the
  session (``sess-<hex>.<node>.<incarnation>``): no coordination at all;
* ``named``: ``{"template_id": ..., "session_id": <caller's name>}``: in a
  cluster the node claims the name with one etcd transaction (and, with
  checkpoints on, looks for a stored session of that name in etcd first).

Sessions are never closed, so they pile up (tens of thousands per node at
the default length). Creations/s and p50/p99 of one creation are rows (the
req/s column counts creations); the ratio to ``single`` of the same kind is
judged against >= 0.5. Every node runs with ``--durability interval`` (the
default: a created session is checkpointed within a second, batched: to
SQLite on one node, to etcd in a cluster).

Pinning: every orchestrator node on the server CPU (a cluster's nodes share
it, so each subject has one core of orchestrators, whatever its node count),
the load generator on the other; etcd's members are not pinned (they would
run on other machines) and their CPU is reported apart (``etcd CPU``): on
this 2-core machine they take it from the other two.
"""

from __future__ import annotations

import contextlib
from typing import Any

from .. import loadgen, procs
from ..core import (
    Metric,
    Progress,
    RunConfig,
    ScenarioResult,
    Targets,
    summarize,
    summarize_measures,
)
from ..etcd import Etcd, EtcdUnavailable, etcd_cluster
from . import register
from ._loadtest import describe, loadgen_note, noise_note
from ._scale import (
    Node,
    backend_for,
    cluster_spec,
    orchestrator_spec,
    run_loadgen,
    serve_node,
)

__all__ = ["ScaleCreation"]

TEMPLATE = "bench-hello"
NODES = (1, 2, 3)
QUICK_NODES = (2,)
KINDS = ("generated", "named")
BASELINE = "single"
DURABILITY = "interval"
TARGETS = Targets(min_rps_ratio=0.5, max_p99_ratio=None)
QUICK_CONNECTIONS = 4
METRICS = [
    Metric("cpu_per_creation", "server CPU per creation", "µs"),
    Metric("etcd_cpu", "etcd CPU (3 members)", "%"),
    Metric("etcd_per_creation", "etcd CPU per creation", "µs"),
]


def _subjects(config: RunConfig) -> list[str]:
    nodes = QUICK_NODES if config.quick else NODES
    return [BASELINE, *(f"cluster-{k}" for k in nodes)]


def _connections(config: RunConfig) -> int:
    return QUICK_CONNECTIONS if config.quick else config.connections


class ScaleCreation:
    """The ``scale-creation`` scenario."""

    name = "scale-creation"
    description = (
        "session creations/s (server-named and caller-named ids) on 1-3 serve --cluster nodes "
        "on a real 3-member etcd vs one node without a cluster"
    )

    def steps(self, config: RunConfig) -> int:
        """One step per (repetition, subject, kind)."""
        return config.repetitions * len(_subjects(config)) * len(KINDS)

    def run(self, config: RunConfig, progress: Progress) -> ScenarioResult:
        """Start etcd, then each subject's nodes per repetition, each kind in turn."""
        backend = backend_for(config)
        pinning = procs.plan_pinning(config.pin)
        samples: list[dict[str, Any]] = []
        notes: list[str] = []
        try:
            with etcd_cluster(config.workdir) as etcd:
                notes.append(etcd.describe())
                for rep in range(1, config.repetitions + 1):
                    for subject in _subjects(config):
                        samples += self._subject(
                            config, progress, backend, pinning, etcd, subject, rep
                        )
        except EtcdUnavailable as exc:
            notes.append(f"skipped: {exc}")
            return ScenarioResult(self.name, [], samples, notes=notes)
        rows = []
        for kind in KINDS:
            group = [s for s in samples if s["kind"] == kind]
            rows += summarize(self.name, group, baseline=f"{BASELINE} {kind}", targets=TARGETS)
        measures = summarize_measures(self.name, samples, METRICS, baseline=None)
        failures = [
            f"{self.name} {r.subject}: {r.errors} errors" for r in rows if r.errors or not r.rps.min
        ]
        notes += [
            f"{backend} only; pinning: {pinning.to_json()} (every orchestrator node on the "
            "server CPU; etcd unpinned)",
            f"--durability {DURABILITY} on every node; {_connections(config)} connections, "
            "each looping POST /v1/sessions; sessions never closed",
            loadgen_note(samples),
        ]
        noise = noise_note(samples)
        if noise:
            notes.append(noise)
        return ScenarioResult(
            name=self.name,
            rows=rows,
            samples=samples,
            notes=notes,
            settings={
                "backend": backend,
                "subjects": _subjects(config),
                "kinds": list(KINDS),
                "template": TEMPLATE,
                "durability": DURABILITY,
                "connections": _connections(config),
                "pinning": pinning.to_json(),
                "targets": {"min_ratio_to_single": TARGETS.min_rps_ratio},
            },
            measures=measures,
            failures=failures,
        )

    def _subject(
        self,
        config: RunConfig,
        progress: Progress,
        backend: str,
        pinning: procs.Pinning,
        etcd: Etcd,
        subject: str,
        rep: int,
    ) -> list[dict[str, Any]]:
        if subject == BASELINE:
            specs = [
                orchestrator_spec("single", extra=("--durability", DURABILITY)),
            ]
        else:
            count = int(subject.rpartition("-")[2])
            specs = [
                cluster_spec(
                    f"{subject}-n{i}", etcd.url, f"{subject}-r{rep}-n{i}", durability=DURABILITY
                )
                for i in range(count)
            ]
        samples = []
        with contextlib.ExitStack() as stack:
            nodes: list[Node] = [
                stack.enter_context(serve_node(spec, backend, config, pinning.server))
                for spec in specs
            ]
            for kind in KINDS:
                label = f"{subject} {kind}"
                progress.start(f"{self.name} {backend} {label} rep {rep}")
                opts = loadgen.Options(
                    port=nodes[0].port,
                    ports=tuple(node.port for node in nodes),
                    connections=_connections(config),
                    warmup=config.warmup,
                    duration=config.duration,
                    server_pid=nodes[0].pid,
                    also_server_pids=tuple(node.pid for node in nodes[1:]),
                    aux_pids=etcd.pids if subject != BASELINE else (),
                    create=TEMPLATE,
                    named=kind == "named",
                    session_prefix=f"{subject}-r{rep}-",  # names never reused
                )
                result = run_loadgen(opts, pinning.loadgen)
                metrics: dict[str, float] = {}
                rate = result["rps"]
                if result["server_cpu_percent"] and rate:
                    metrics["cpu_per_creation"] = result["server_cpu_percent"] / 100 / rate * 1e6
                aux = result.get("aux_cpu_percent")
                if aux is not None:
                    metrics["etcd_cpu"] = aux
                    if rate:
                        metrics["etcd_per_creation"] = aux / 100 / rate * 1e6
                text = describe(result).replace("req/s", "creations/s")
                if aux is not None:
                    text += f", etcd {aux:.0f} %"
                progress.finish(text)
                samples.append(
                    {
                        "backend": backend,
                        "subject": label,
                        "kind": kind,
                        "nodes": len(nodes),
                        "repetition": rep,
                        "loadgen_command": loadgen.command(opts),
                        "metrics": metrics,
                        "result": result,
                    }
                )
        return samples


register(ScaleCreation())
