"""``runtime-rps``: throughput and latency of ``POST /invocations``.

The example agent on the runtime against a bare raw-ASGI hello world on the
same hypercorn settings and event loop, alternating baseline and runtime in
each repetition, on each backend. Targets: runtime req/s >= 0.9 x baseline,
runtime p99 <= 1.5 x baseline p99.
"""

from __future__ import annotations

from ..core import Progress, RunConfig, ScenarioResult, Targets, summarize
from ..servers import BASELINE, RUNTIME
from . import register
from ._loadtest import Subject, loadgen_note, noise_note, run_pairs

__all__ = ["RuntimeRps"]

BODY = b'{"query":"hello"}'
TARGETS = Targets(min_rps_ratio=0.9, max_p99_ratio=1.5)


class RuntimeRps:
    """The ``runtime-rps`` scenario."""

    name = "runtime-rps"
    description = "POST /invocations req/s, p50, p99: runtime vs raw-ASGI hypercorn baseline"
    subjects = (
        Subject("baseline", BASELINE, "/invocations"),
        Subject("runtime", RUNTIME, "/invocations"),
    )

    def steps(self, config: RunConfig) -> int:
        """One step per (backend, repetition, subject)."""
        return len(config.backends) * config.repetitions * len(self.subjects)

    def run(self, config: RunConfig, progress: Progress) -> ScenarioResult:
        """Measure every (backend, subject) pair ``config.repetitions`` times."""
        samples, pinning = run_pairs(
            self.name, self.subjects, config, progress, backends=config.backends, body=BODY
        )
        rows = summarize(self.name, samples, baseline=BASELINE.name, targets=TARGETS)
        notes = [f"pinning: {pinning.to_json()}", loadgen_note(samples)]
        noise = noise_note(samples)
        if noise:
            notes.append(noise)
        return ScenarioResult(
            name=self.name,
            rows=rows,
            samples=samples,
            notes=notes,
            settings={
                "body": BODY.decode(),
                "targets": {"min_rps_ratio": 0.9, "max_p99_ratio": 1.5},
                "pinning": pinning.to_json(),
            },
        )


register(RuntimeRps())
