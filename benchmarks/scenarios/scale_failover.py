"""``scale-failover``: ``kill -9`` of a cluster node under load, per durability mode.

A real 3-member etcd on loopback (:mod:`benchmarks.etcd`), started once.
For each durability mode -- ``turn``, ``interval``, ``none`` -- and
repetition, two fresh ``serve --cluster`` nodes with ``--durability MODE
--lease-ttl 5`` (2 with ``--quick``) and the counter agent
(``benchmarks/templates/counter``: the turn count lives in
``context.state`` and each reply carries it). :mod:`benchmarks.failovergen`,
in its own process, primes 100 sessions (10 with ``--quick``) on node A
(their first turn there, so A claims them), loops turns on all of them
through node B (forwarded to A) for 3 s (0.5 s), then ``kill -9`` A itself
and keeps every session retrying through B every 50 ms until a turn
succeeds.

Per mode: the *recovery time* per session, from the kill to the reply of
its first successful turn (p50, p99, max over the sessions; the lease TTL
bounds it from below, the 50 ms retry period adds up to that much), and
the *lost turns*, acknowledged turns the session forgot (the client's count
of ``200`` replies against the counter the first reply after the failover
carries). ``turn`` must lose none (target); ``interval`` loses up to a
checkpoint interval's worth (1 s) per session; ``none`` loses every turn
(the session comes back empty). ``applied but unacknowledged``: turns that
were running at the kill and stored without their reply getting out.

Pinning: both nodes on the server CPU, the client on the other, etcd
unpinned (as in ``scale-creation``).
"""

from __future__ import annotations

import contextlib
from typing import Any

from .. import failovergen, procs
from ..core import Bound, Metric, Progress, RunConfig, ScenarioResult, summarize_measures
from ..etcd import EtcdUnavailable, etcd_cluster
from . import register
from ._scale import COUNTER_TEMPLATE, backend_for, cluster_spec, serve_node

__all__ = ["ScaleFailover"]

MODES = ("turn", "interval", "none")
TEMPLATE = "bench-counter"
LEASE_TTL = 5.0
QUICK_LEASE_TTL = 2.0
SESSIONS = 100
QUICK_SESSIONS = 10
BEFORE = 3.0
QUICK_BEFORE = 0.5
RETRY = 0.05

METRICS = [
    Metric("recovery_p50", "recovery p50 (kill -> first turn)", "ms"),
    Metric("recovery_p99", "recovery p99", "ms"),
    Metric("recovery_max", "recovery max (all sessions back)", "ms"),
    Metric("recovery_ttl", "recovery p50 / lease TTL", "x", digits=2),
    Metric(
        "lost",
        "acknowledged turns lost (all sessions)",
        "turns",
        target=Bound("<=", 0),
        target_subjects=("turn",),
    ),
    Metric("lost_share", "acknowledged turns lost", "%", digits=1),
    Metric("lost_per_session", "lost turns per session (mean)", "turns", digits=2),
    Metric("lost_max", "lost turns, worst session", "turns"),
    Metric("acked", "acknowledged turns before the kill", "turns"),
    Metric("turns_before", "turns/s before the kill (through B)", "/s"),
    Metric("applied_unacked", "applied but unacknowledged turns", "turns"),
    Metric("unrecovered", "sessions not back in time", "sessions"),
]


def _sizes(config: RunConfig) -> tuple[float, int, float]:
    """(lease TTL, sessions, seconds of load before the kill)."""
    if config.quick:
        return QUICK_LEASE_TTL, QUICK_SESSIONS, QUICK_BEFORE
    return LEASE_TTL, SESSIONS, BEFORE


def _metrics(result: dict[str, Any], ttl: float) -> dict[str, float]:
    recovery = result["recovery_ms"]
    acked = result["acked_before_kill"]
    out: dict[str, float] = {
        "lost": result["lost_turns"],
        "lost_per_session": result["lost_turns_mean"],
        "lost_max": result["lost_turns_max"],
        "acked": acked,
        "turns_before": result["turns_before_kill_per_second"],
        "applied_unacked": result["applied_unacked"],
        "unrecovered": result["unrecovered"],
    }
    if acked:
        out["lost_share"] = 100.0 * result["lost_turns"] / acked
    if result["recovered"]:
        out["recovery_p50"] = recovery["p50"]
        out["recovery_p99"] = recovery["p99"]
        out["recovery_max"] = recovery["max"]
        out["recovery_ttl"] = recovery["p50"] / 1000.0 / ttl
    return out


def describe(result: dict[str, Any]) -> str:
    recovery = result["recovery_ms"]
    text = (
        f"{result['recovered']}/{result['primed']} back, recovery p50 {recovery['p50']:.0f} ms "
        f"p99 {recovery['p99']:.0f} ms; lost {result['lost_turns']} of "
        f"{result['acked_before_kill']} acked turns"
    )
    if result["applied_unacked"]:
        text += f", {result['applied_unacked']} applied unacked"
    if result["errors"]:
        text += f", {result['errors']} errors before the kill {result['errors_before_kill']}"
    retries = result.get("prime_retries")
    if retries:
        text += f", priming retried {sum(retries.values())} times {retries}"
    return text


class ScaleFailover:
    """The ``scale-failover`` scenario."""

    name = "scale-failover"
    description = (
        "kill -9 of a cluster node under load: time to each moved session's first turn "
        "(p50/p99) and acknowledged turns lost, per --durability (turn, interval, none)"
    )

    def steps(self, config: RunConfig) -> int:
        """One step per (repetition, mode)."""
        return config.repetitions * len(MODES)

    def run(self, config: RunConfig, progress: Progress) -> ScenarioResult:
        """Start etcd, then two fresh nodes per (repetition, mode)."""
        backend = backend_for(config)
        pinning = procs.plan_pinning(config.pin)
        ttl, sessions, before = _sizes(config)
        samples: list[dict[str, Any]] = []
        failures: list[str] = []
        notes: list[str] = []
        try:
            with etcd_cluster(config.workdir) as etcd:
                notes.append(etcd.describe())
                for rep in range(1, config.repetitions + 1):
                    for mode in MODES:
                        progress.start(f"{self.name} {backend} {mode} rep {rep}")
                        specs = [
                            cluster_spec(
                                f"failover-{mode}-{side}",
                                etcd.url,
                                f"fo-{mode}-r{rep}-{side}",
                                templates=(COUNTER_TEMPLATE,),
                                durability=mode,
                                lease_ttl=ttl,
                            )
                            for side in ("a", "b")
                        ]
                        with contextlib.ExitStack() as stack:
                            owner, entry = (
                                stack.enter_context(
                                    serve_node(spec, backend, config, pinning.server)
                                )
                                for spec in specs
                            )
                            opts = failovergen.FailoverOptions(
                                port=entry.port,
                                owner_port=owner.port,
                                kill_pid=owner.pid,
                                template=TEMPLATE,
                                sessions=sessions,
                                before=before,
                                retry=RETRY,
                                timeout=4 * ttl + 20.0,
                                session_prefix=f"fo-{mode}-r{rep}-",
                            )
                            result = procs.run_json(
                                failovergen.command(opts),
                                cpus=pinning.loadgen,
                                timeout=before + opts.timeout + 2 * opts.io_timeout + 30.0,
                            )
                        progress.finish(describe(result))
                        if result["unrecovered"] or result["primed"] < sessions:
                            failures.append(
                                f"{self.name} {mode} rep {rep}: {result['primed']}/{sessions} "
                                f"primed, {result['unrecovered']} not back within "
                                f"{opts.timeout:g} s"
                            )
                        samples.append(
                            {
                                "backend": backend,
                                "subject": mode,
                                "repetition": rep,
                                "lease_ttl": ttl,
                                "command": list(specs[0].argv),
                                "loadgen_command": failovergen.command(opts),
                                "metrics": _metrics(result, ttl),
                                "result": result,
                            }
                        )
        except EtcdUnavailable as exc:
            notes.append(f"skipped: {exc}")
            return ScenarioResult(self.name, [], samples, notes=notes)
        measures = summarize_measures(self.name, samples, METRICS, baseline=None)
        notes += [
            f"{backend} only; pinning: {pinning.to_json()} (both nodes on the server CPU, "
            "etcd unpinned)",
            f"--lease-ttl {ttl:g}; {sessions} sessions primed on node A, {before:g} s of turns "
            f"through node B, kill -9 of A, retries through B every {RETRY * 1000:.0f} ms "
            "(Retry-After not waited for)",
        ]
        return ScenarioResult(
            name=self.name,
            rows=[],
            samples=samples,
            notes=notes,
            settings={
                "backend": backend,
                "modes": list(MODES),
                "lease_ttl": ttl,
                "sessions": sessions,
                "before_kill_seconds": before,
                "retry_seconds": RETRY,
                "template": TEMPLATE,
                "pinning": pinning.to_json(),
            },
            measures=measures,
            failures=failures,
        )


register(ScaleFailover())
