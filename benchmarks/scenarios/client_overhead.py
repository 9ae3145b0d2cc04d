"""``client-overhead``: what the client and its supervisor cost a caller.

The orchestrator (``ppio-sandbox-cli serve`` with the in-process hello
template, uvloop worker) is pinned to the server CPU; the caller is
``python -m benchmarks.clientgen`` pinned to the other CPU, on the backend
being measured (the client's backend: the server is the same for both).

- Throughput: closed-loop ``POST /v1/agents/bench-hello/invocations`` from
  16 concurrent tasks, each with its own session: through
  ``AgentRuntimeClient.invoke_agent`` against bare ``httpx`` posting the same
  bytes and headers (the baseline), alternating on the same server. Since
  the server is the bottleneck, the client's CPU per call is reported too.
- Pool: acquire + release of a warm pooled session, with the health check
  made on every acquire, and relying on recent use.
- Retry amplification: calls against a server answering every request 503;
  extra HTTP requests per call (target <= 10 %, the retry budget's ratio).
"""

from __future__ import annotations

import sys
from typing import Any

from .. import procs
from ..core import Bound, Metric, Progress, RunConfig, ScenarioResult, summarize_measures
from ..servers import BASELINE_UNAVAILABLE, ORCHESTRATOR, RunningServer
from . import register
from ._loadtest import serve_pinned

__all__ = ["ClientOverhead"]

TEMPLATE = "bench-hello"
CONCURRENCY = 16
AMPLIFICATION_TARGET = 10.0

METRICS = (
    Metric("rps", "invocations/s", "/s"),
    Metric("p50", "call p50", "ms", digits=2),
    Metric("p99", "call p99", "ms", digits=2),
    Metric("cpu_us_per_call", "caller CPU per call", "µs"),
    Metric("acquire_checked_p50", "pool acquire+release p50, health-checked", "ms", digits=3),
    Metric("acquire_checked_p99", "pool acquire+release p99, health-checked", "ms", digits=3),
    Metric("acquire_recent_p50", "pool acquire+release p50, recently used", "ms", digits=3),
    Metric("acquire_recent_p99", "pool acquire+release p99, recently used", "ms", digits=3),
    Metric(
        "amplification_percent",
        "extra requests per call under 100 % 503",
        "%",
        digits=1,
        target=Bound("<=", AMPLIFICATION_TARGET),
    ),
)


def _clientgen(
    mode: str,
    server: RunningServer,
    backend: str,
    pinning: procs.Pinning,
    *extra: str,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Run ``python -m benchmarks.clientgen MODE`` on ``backend`` against ``server``,
    pinned to the load generator's CPU; its JSON result."""
    argv = [
        sys.executable,
        "-m",
        "benchmarks.clientgen",
        mode,
        "--url",
        f"http://127.0.0.1:{server.port}",
        "--template",
        TEMPLATE,
        "--backend",
        backend,
        *extra,
    ]
    result: dict[str, Any] = procs.run_json(argv, cpus=pinning.loadgen, timeout=timeout)
    return result


class ClientOverhead:
    """The ``client-overhead`` scenario."""

    name = "client-overhead"
    description = (
        "AgentRuntimeClient vs bare httpx with the same bytes against the orchestrator; "
        "pool acquire latency; retry amplification under 100 % 503"
    )

    def steps(self, config: RunConfig) -> int:
        """Per backend and repetition: httpx, client, pool; then amplification."""
        return len(config.backends) * (config.repetitions * 3 + 1)

    def run(self, config: RunConfig, progress: Progress) -> ScenarioResult:
        """Measure every backend ``config.repetitions`` times."""
        pinning = procs.plan_pinning(config.pin)
        count = 200 if config.quick else 1000
        samples: list[dict[str, Any]] = []
        failures: list[str] = []
        timing = ["--warmup", str(config.warmup), "--duration", str(config.duration)]
        for backend in config.backends:
            for rep in range(1, config.repetitions + 1):
                with serve_pinned(ORCHESTRATOR, "asyncio", config, pinning) as server:
                    for kind in ("httpx", "client"):
                        progress.start(f"{self.name} {backend} {kind} rep {rep}")
                        result = _clientgen(
                            "throughput",
                            server,
                            backend,
                            pinning,
                            "--kind",
                            kind,
                            "--concurrency",
                            str(CONCURRENCY),
                            *timing,
                            timeout=config.warmup + config.duration + 60,
                        )
                        calls = max(1, result["calls"])
                        cpu_us = result["client_cpu_percent"] / 100 * config.duration / calls * 1e6
                        progress.finish(
                            f"{result['rps']:.0f} calls/s, p99 {result['p99']:.1f} ms, "
                            f"{cpu_us:.0f} µs CPU/call, {result['errors']} errors"
                        )
                        if result["errors"]:
                            failures.append(f"{backend} {kind}: {result['error_kinds']}")
                        samples.append(
                            {
                                "backend": backend,
                                "subject": kind,
                                "repetition": rep,
                                "metrics": {
                                    "rps": result["rps"],
                                    "p50": result["p50"],
                                    "p99": result["p99"],
                                    "cpu_us_per_call": round(cpu_us, 1),
                                },
                                "result": result,
                            }
                        )
                    progress.start(f"{self.name} {backend} pool rep {rep}")
                    result = _clientgen("pool", server, backend, pinning, "--count", str(count))
                    progress.finish(
                        f"acquire p50 {result['checked']['p50']:.3f} ms checked, "
                        f"{result['recent']['p50']:.3f} ms recent"
                    )
                    samples.append(
                        {
                            "backend": backend,
                            "subject": "pool",
                            "repetition": rep,
                            "metrics": {
                                f"acquire_{label}_{q}": result[label][q]
                                for label in ("checked", "recent")
                                for q in ("p50", "p99")
                            },
                            "result": result,
                        }
                    )
            progress.start(f"{self.name} {backend} retry amplification")
            with serve_pinned(BASELINE_UNAVAILABLE, "asyncio", config, pinning) as server:
                result = _clientgen(
                    "amplification",
                    server,
                    backend,
                    pinning,
                    "--count",
                    str(count * 2),
                    "--concurrency",
                    str(CONCURRENCY),
                )
            progress.finish(
                f"{result['requests']} requests for {result['calls']} calls "
                f"(+{result['amplification_percent']:.1f} %)"
            )
            samples.append(
                {
                    "backend": backend,
                    "subject": "client",
                    "repetition": 1,
                    "metrics": {"amplification_percent": result["amplification_percent"]},
                    "result": result,
                }
            )
        measures = summarize_measures(self.name, samples, METRICS, baseline="httpx")
        notes = [
            f"{CONCURRENCY} concurrent callers, one session each; the orchestrator runs on "
            "uvloop for every row: the backend is the caller's",
            f"pool: {count} acquire+release cycles of one warm session (max_size 2)",
            f"amplification: {count * 2} calls, {CONCURRENCY} at a time, max_retries 3, "
            "against a server answering 503 to everything",
            f"pinning: {pinning.to_json()}",
        ]
        return ScenarioResult(
            name=self.name,
            rows=[],
            samples=samples,
            notes=notes,
            settings={"concurrency": CONCURRENCY, "template": TEMPLATE, "count": count},
            measures=measures,
            failures=failures,
        )


register(ClientOverhead())
