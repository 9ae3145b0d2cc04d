"""``scale-checkpoints``: what checkpointing sessions costs per turn, by durability.

Turns on the counter agent (``benchmarks/templates/counter``: every turn
changes ``context.state``, a small bounded one, so every turn dirties its
session), ``POST /v1/agents/bench-counter/invocations`` in a closed loop
(:mod:`benchmarks.loadgen`), one session per connection, at 1 and 64
connections (16 with ``--quick``):

* one node, checkpoints in SQLite (``sessions.sqlite3`` in the data dir):
  ``none`` (the baseline: nothing written), ``interval`` (dirty sessions
  written together every second) and ``turn`` (written before each reply,
  group-committed, ``synchronous=FULL``);
* one ``serve --cluster`` node on a real 3-member etcd (fsync on),
  checkpoints in etcd: ``cluster-none`` (the baseline) and ``cluster-turn``
  (each group commit is one etcd transaction, fenced).

Each repetition starts every subject's server (all pinned to the server
CPU, the idle ones waiting) and, level by level, drives the baseline then
the others; the load generator is on the other CPU, etcd unpinned with its
CPU reported apart. Rows: turns/s, p50, p99 and their ratios to the
baseline; figures: checkpoints written per turn (``ppio_checkpoints_total``
over ``ppio_turns_total`` from ``/metrics``; a round writes each dirty
session once, so under 1 when a session runs several turns between
rounds), checkpoint bytes per turn, server CPU per turn, etcd CPU per turn.
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
    concurrency_series,
    summarize,
    summarize_measures,
)
from ..etcd import Etcd, EtcdUnavailable, etcd_cluster
from ..servers import ServerSpec
from . import register
from ._loadtest import describe, loadgen_note, noise_note
from ._scale import (
    COUNTER_TEMPLATE,
    backend_for,
    cluster_spec,
    metric_delta,
    orchestrator_spec,
    run_loadgen,
    scrape_metrics,
    serve_node,
)

__all__ = ["ScaleCheckpoints"]

PATH = "/v1/agents/bench-counter/invocations"
BODY = b'{"tag":1}'
LEVELS = (1, 64)
QUICK_LEVELS = (16,)
SINGLE = ("none", "interval", "turn")
CLUSTER = ("none", "turn")
METRICS = [
    Metric("checkpoints_per_turn", "checkpoints written per turn", "", digits=3),
    Metric("bytes_per_turn", "checkpoint bytes per turn", "B"),
    Metric("cpu_per_turn", "server CPU per turn", "µs"),
    Metric("etcd_per_turn", "etcd CPU per turn (3 members)", "µs"),
]


def _label(mode: str, cluster: bool) -> str:
    return f"cluster-{mode}" if cluster else mode


def _specs(etcd: Etcd | None, rep: int) -> list[tuple[str, ServerSpec]]:
    specs = [
        (
            _label(mode, False),
            orchestrator_spec(f"checkpoints-{mode}", (COUNTER_TEMPLATE,), ("--durability", mode)),
        )
        for mode in SINGLE
    ]
    if etcd is not None:
        specs += [
            (
                _label(mode, True),
                cluster_spec(
                    f"checkpoints-cluster-{mode}",
                    etcd.url,
                    f"ck-{mode}-r{rep}",
                    templates=(COUNTER_TEMPLATE,),
                    durability=mode,
                ),
            )
            for mode in CLUSTER
        ]
    return specs


class ScaleCheckpoints:
    """The ``scale-checkpoints`` scenario."""

    name = "scale-checkpoints"
    description = (
        "cost of session checkpoints per turn: --durability interval and turn vs none on one "
        "node (SQLite), and turn vs none on a cluster node (etcd): turns/s, p50/p99"
    )

    def steps(self, config: RunConfig) -> int:
        """One step per (repetition, level, subject)."""
        levels = config.sweep(LEVELS, QUICK_LEVELS)
        return config.repetitions * len(levels) * (len(SINGLE) + len(CLUSTER))

    def run(self, config: RunConfig, progress: Progress) -> ScenarioResult:
        """etcd once; every subject's server per repetition; the levels in turn."""
        backend = backend_for(config)
        pinning = procs.plan_pinning(config.pin)
        levels = config.sweep(LEVELS, QUICK_LEVELS)
        samples: list[dict[str, Any]] = []
        notes: list[str] = []
        with contextlib.ExitStack() as outer:
            etcd: Etcd | None
            try:
                etcd = outer.enter_context(etcd_cluster(config.workdir))
                notes.append(etcd.describe())
            except EtcdUnavailable as exc:
                etcd = None
                notes.append(f"cluster subjects skipped: {exc}")
            for rep in range(1, config.repetitions + 1):
                with contextlib.ExitStack() as stack:
                    servers = [
                        (
                            label,
                            stack.enter_context(serve_node(spec, backend, config, pinning.server)),
                        )
                        for label, spec in _specs(etcd, rep)
                    ]
                    for level in levels:
                        for label, node in servers:
                            progress.start(f"{self.name} {backend} {label} c={level} rep {rep}")
                            before = scrape_metrics(node.port)
                            opts = loadgen.Options(
                                port=node.port,
                                path=PATH,
                                body=BODY,
                                connections=level,
                                warmup=config.warmup,
                                duration=config.duration,
                                server_pid=node.pid,
                                aux_pids=etcd.pids if etcd and label.startswith("cluster") else (),
                                # Cluster nodes share etcd: a name one claimed, the other
                                # would forward to it.
                                session_prefix=f"{label}-r{rep}-",
                            )
                            result = run_loadgen(opts, pinning.loadgen)
                            after = scrape_metrics(node.port)
                            metrics = _metrics(result, before, after)
                            text = describe(result)
                            if "checkpoints_per_turn" in metrics:
                                text += f", {metrics['checkpoints_per_turn']:.2f} checkpoints/turn"
                            progress.finish(text)
                            samples.append(
                                {
                                    "backend": backend,
                                    "subject": label,
                                    "repetition": rep,
                                    "concurrency": level,
                                    "loadgen_command": loadgen.command(opts),
                                    "metrics": metrics,
                                    "result": result,
                                }
                            )
        single = [s for s in samples if not s["subject"].startswith("cluster")]
        cluster = [s for s in samples if s["subject"].startswith("cluster")]
        rows = summarize(self.name, single, baseline="none", targets=None)
        rows += summarize(self.name, cluster, baseline="cluster-none", targets=None)
        per_level = [{**s, "subject": f"{s['subject']} c={s['concurrency']}"} for s in samples]
        measures = summarize_measures(self.name, per_level, METRICS, baseline=None)
        failures = [
            f"{self.name} {r.subject} c={r.concurrency}: {r.errors} errors"
            for r in rows
            if r.errors or not r.rps.min
        ]
        notes += [
            f"{backend} only; pinning: {pinning.to_json()} (every server on the server CPU, "
            "etcd unpinned)",
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
                "path": PATH,
                "body": BODY.decode(),
                "levels": list(levels),
                "single_node": list(SINGLE),
                "cluster": list(CLUSTER),
                "pinning": pinning.to_json(),
            },
            measures=measures,
            failures=failures,
            series=concurrency_series(rows, what="turns/s", unit="turn"),
        )


def _metrics(
    result: dict[str, Any], before: dict[str, float], after: dict[str, float]
) -> dict[str, float]:
    out: dict[str, float] = {}
    turns = metric_delta(before, after, "ppio_turns_total")
    if turns > 0:
        out["checkpoints_per_turn"] = metric_delta(before, after, "ppio_checkpoints_total") / turns
        out["bytes_per_turn"] = metric_delta(before, after, "ppio_checkpoint_bytes_total") / turns
    rate = result["rps"]
    if result["server_cpu_percent"] and rate:
        out["cpu_per_turn"] = result["server_cpu_percent"] / 100.0 / rate * 1e6
    aux = result.get("aux_cpu_percent")
    if aux is not None and rate:
        out["etcd_per_turn"] = aux / 100.0 / rate * 1e6
    return out


register(ScaleCheckpoints())
