"""``session-churn``: how fast sessions are created (and created, used, closed).

In process (no HTTP), one fresh process per measurement, pinned to the
server CPU: ``Orchestrator.create_session`` on the hello template (a
``TemplateStore`` in a temporary data dir, the template registered with
``register_directory``) against spawning a bare anyio task with its own
memory object stream per "session" on the same event loop. Both also run
create + first turn + close cycles. Target: >= 20,000 orchestrator session
creations/s.

Over HTTP: cycles of ``POST /v1/sessions``, ``POST
/v1/sessions/<id>/invocations``, ``DELETE /v1/sessions/<id>`` on every
keep-alive connection of the load generator (see ``benchmarks/loadgen.py
--churn``), against the same three requests answered by the raw-ASGI hello
world: the orchestrator's cost over three bare HTTP round trips. Reported,
not judged.
"""

from __future__ import annotations

from typing import Any

from .. import procs
from ..core import Bound, Metric, Progress, RunConfig, ScenarioResult, summarize_measures
from ..servers import BASELINE, ORCHESTRATOR
from . import register
from ._loadtest import Subject, loadgen_note, noise_note, run_pairs
from ._probes import run_probe

__all__ = ["SessionChurn"]

TEMPLATE = "bench-hello"
BODY = b'{"query":"hello"}'
CREATION_TARGET = 20_000.0
INPROC_SUBJECTS = ("anyio-task", "orchestrator")
INPROC_BASELINE = "anyio-task"
INPROC_METRICS = (
    Metric(
        "creations_per_s",
        "in-process session creations/s",
        "/s",
        target=Bound(">=", CREATION_TARGET),
        target_subjects=("orchestrator",),
    ),
    Metric("cycles_per_s", "in-process create+turn+close/s", "/s"),
    Metric("closes_per_s", "in-process session closes/s", "/s"),
)
HTTP_SUBJECTS = (
    Subject("hello-3-requests", BASELINE, "/", churn=TEMPLATE),
    Subject("orchestrator", ORCHESTRATOR, "/", churn=TEMPLATE),
)
HTTP_METRICS = (
    Metric("cycles_per_s", "HTTP create+turn+close cycles/s", "/s"),
    Metric("p50_ms", "HTTP cycle p50", "ms", digits=2),
    Metric("p99_ms", "HTTP cycle p99", "ms", digits=2),
    Metric("server_cpu", "HTTP server CPU", "%"),
)


def _counts(config: RunConfig) -> tuple[int, int]:
    """(sessions created, create+turn+close cycles) per in-process measurement."""
    return (5_000, 1_000) if config.quick else (50_000, 20_000)


class SessionChurn:
    """The ``session-churn`` scenario."""

    name = "session-churn"
    description = (
        "session creations/s in process (host object vs bare anyio task + stream) and "
        "create+turn+close cycles/s over HTTP (vs 3 hello-world requests)"
    )

    def steps(self, config: RunConfig) -> int:
        """In-process and HTTP steps per (backend, repetition, subject)."""
        per = len(config.backends) * config.repetitions
        return per * (len(INPROC_SUBJECTS) + len(HTTP_SUBJECTS))

    def run(self, config: RunConfig, progress: Progress) -> ScenarioResult:
        """In-process probes first, then the HTTP pairs."""
        pinning = procs.plan_pinning(config.pin)
        count, cycles = _counts(config)
        inproc: list[dict[str, Any]] = []
        for backend in config.backends:
            for rep in range(1, config.repetitions + 1):
                for subject in INPROC_SUBJECTS:
                    progress.start(f"{self.name} in-process {backend} {subject} rep {rep}")
                    args = ["churn", "--backend", backend, "--subject", subject]
                    args += ["--count", str(count), "--cycles", str(cycles)]
                    result = run_probe(args, config, cpus=pinning.server, timeout=180.0)
                    progress.finish(
                        f"{result['creations_per_s']:,.0f} creations/s, "
                        f"{result['cycles_per_s']:,.0f} create+turn+close/s"
                    )
                    inproc.append(
                        {
                            "backend": backend,
                            "subject": subject,
                            "repetition": rep,
                            "kind": "in-process",
                            "metrics": result,
                        }
                    )
        http, _ = run_pairs(
            self.name, HTTP_SUBJECTS, config, progress, backends=config.backends, body=BODY
        )
        for sample in http:
            r = sample["result"]
            sample["kind"] = "http"
            sample["metrics"] = {
                "cycles_per_s": r["rps"],
                "p50_ms": r["p50"],
                "p99_ms": r["p99"],
                "server_cpu": r["server_cpu_percent"] or 0.0,
            }
        measures = summarize_measures(
            self.name, inproc, INPROC_METRICS, baseline=INPROC_BASELINE
        ) + summarize_measures(self.name, http, HTTP_METRICS, baseline=HTTP_SUBJECTS[0].label)
        notes = [
            f"in process: {count:,} sessions created then closed, then {cycles:,} "
            "create+turn+close cycles, sequentially in one task, per measurement; the "
            "anyio-task figure counts until every task has started",
            f"HTTP: {config.connections} connections each looping create / invoke / delete; "
            "the baseline answers the same three requests with the raw-ASGI hello world",
            loadgen_note(http),
        ]
        noise = noise_note(http)
        if noise:
            notes.append(noise)
        failures = [
            f"{self.name} {s['backend']} {s['subject']}: {s['result']['error_kinds']}"
            for s in http
            if s["result"]["errors"] or not s["result"]["requests"]
        ]
        return ScenarioResult(
            name=self.name,
            rows=[],
            samples=inproc + http,
            notes=notes,
            settings={
                "sessions_per_measurement": count,
                "cycles_per_measurement": cycles,
                "connections": config.connections,
                "template": TEMPLATE,
                "targets": {"min_creations_per_s": CREATION_TARGET},
                "pinning": pinning.to_json(),
            },
            measures=measures,
            failures=failures,
        )


register(SessionChurn())
