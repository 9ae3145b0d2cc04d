"""``runtime-rps``: throughput and latency of ``POST /invocations``.

The example agent on the runtime against a bare raw-ASGI hello world on the
same hypercorn settings and event loop, alternating baseline and runtime in
each repetition, on each backend. Targets: runtime req/s >= 0.9 x baseline,
runtime p99 <= 1.5 x baseline p99.
"""

from __future__ import annotations

from typing import Any

from .. import loadgen, procs
from ..core import Progress, RunConfig, ScenarioResult, Targets, summarize
from ..servers import BASELINE, RUNTIME, serve
from . import register

__all__ = ["RuntimeRps"]

BODY = b'{"query":"hello"}'
TARGETS = Targets(min_rps_ratio=0.9, max_p99_ratio=1.5)
NOISE_CPU = 10.0
"""CPU % of a core used by other processes above which a sample is called noisy."""


class RuntimeRps:
    """The ``runtime-rps`` scenario."""

    name = "runtime-rps"
    description = "POST /invocations req/s, p50, p99: runtime vs raw-ASGI hypercorn baseline"
    subjects = (BASELINE, RUNTIME)

    def steps(self, config: RunConfig) -> int:
        """One step per (backend, repetition, subject)."""
        return len(config.backends) * config.repetitions * len(self.subjects)

    def run(self, config: RunConfig, progress: Progress) -> ScenarioResult:
        """Measure every (backend, subject) pair ``config.repetitions`` times."""
        pinning = procs.plan_pinning(config.pin)
        samples: list[dict[str, Any]] = []
        for backend in config.backends:
            for rep in range(1, config.repetitions + 1):
                for spec in self.subjects:
                    progress.start(f"{self.name} {backend} {spec.name} rep {rep}")
                    with serve(
                        spec,
                        backend,
                        cpus=pinning.server,
                        logdir=config.workdir,
                        startup_timeout=config.startup_timeout,
                        stop_timeout=config.stop_timeout,
                    ) as server:
                        opts = loadgen.Options(
                            port=server.port,
                            path="/invocations",
                            body=BODY,
                            connections=config.connections,
                            warmup=config.warmup,
                            duration=config.duration,
                            server_pid=server.pid,
                        )
                        timeout = config.warmup + config.duration + 30.0
                        result = procs.run_json(
                            loadgen.command(opts), cpus=pinning.loadgen, timeout=timeout
                        )
                    progress.finish(_describe(result))
                    samples.append(
                        {
                            "backend": backend,
                            "subject": spec.name,
                            "repetition": rep,
                            "command": spec.command("127.0.0.1:PORT", backend),
                            "startup_seconds": round(server.startup_seconds, 3),
                            "result": result,
                        }
                    )
        rows = summarize(self.name, samples, baseline=BASELINE.name, targets=TARGETS)
        notes = [f"pinning: {pinning.to_json()}"]
        notes.append(_loadgen_note(samples))
        noisy = [
            s["result"]["other_cpu_percent"]
            for s in samples
            if (s["result"].get("other_cpu_percent") or 0.0) > NOISE_CPU
        ]
        if noisy:
            notes.append(
                f"other processes used {min(noisy):.0f}-{max(noisy):.0f} % of a core in "
                f"{len(noisy)} of {len(samples)} measured windows: figures are noisy"
            )
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


def _loadgen_note(samples: list[dict[str, Any]]) -> str:
    """Whether the load generator, rather than the server, was the bottleneck."""
    peak = max(s["result"]["loadgen_cpu_percent"] for s in samples)
    saturated = sum(1 for s in samples if s["result"]["loadgen_saturated"])
    if saturated:
        return (
            f"load generator saturated (>= {loadgen.SATURATED_CPU:g} % of a core) in "
            f"{saturated} of {len(samples)} samples: those figures are lower bounds"
        )
    return (
        f"load generator CPU at most {peak:.0f} % of a core "
        f"(saturation threshold {loadgen.SATURATED_CPU:g} %): not the bottleneck"
    )


def _describe(result: dict[str, Any]) -> str:
    text = (
        f"{result['rps']:.0f} req/s, p99 {result['p99']:.1f} ms, "
        f"cpu server {result['server_cpu_percent']} % / loadgen {result['loadgen_cpu_percent']} %"
    )
    if (result.get("other_cpu_percent") or 0.0) > NOISE_CPU:
        text += f" / other {result['other_cpu_percent']} % (noisy)"
    if result["errors"]:
        text += f", {result['errors']} errors {result['error_kinds']}"
    return text


register(RuntimeRps())
