"""``runtime-stream``: chunks/s and time to first chunk of a streaming agent.

An agent yielding 1,000 small chunks as Server-Sent Events
(``benchmarks/agents/stream_agent.py``), read to the end in a closed loop by
1 and then by 50 concurrent readers (:mod:`benchmarks.streamgen`, its own
process, pinned away from the server). Subjects: the runtime (hypercorn,
uvloop or trio), the shipped peers serving the same agent as they ship
(asyncio only; see :mod:`benchmarks.peers`), and the floor: a bare raw-ASGI
SSE stream on hypercorn with the runtime's settings (``baseline``). One
server per (backend, subject, repetition) serves both reader counts; the
subjects of a backend alternate within each repetition. Reported, not
judged: ratios to the floor, and the runtime's to each peer.
"""

from __future__ import annotations

from typing import Any

from .. import peers, procs, streamgen
from ..core import Metric, Progress, RunConfig, ScenarioResult, Spread, summarize_measures
from ..servers import BASELINE_SSE, RUNTIME_STREAM, ServerSpec
from . import register
from ._loadtest import noise_and_errors, results_noise_note, serve_pinned
from .runtime_rps import peer_measures

__all__ = ["RuntimeStream"]

CHUNKS = 1000
READERS = (1, 50)
BODY = b'{"count":%d}' % CHUNKS


def _metrics() -> list[Metric]:
    out = []
    for n in READERS:
        who = f"{n} reader{'s' if n > 1 else ''}"
        out += [
            Metric(f"chunks_per_s@{n}", f"chunks/s, {who}", "chunks/s"),
            Metric(f"ttfc_p50@{n}", f"TTFC p50, {who}", "ms", digits=2),
            Metric(f"ttfc_p99@{n}", f"TTFC p99, {who}", "ms", digits=2),
        ]
    return out


METRICS = _metrics()


def describe(results: dict[int, dict[str, Any]]) -> str:
    """The progress line: chunks/s and TTFC p50 per reader count, CPU, errors."""
    parts = []
    for n, r in results.items():
        text = (
            f"{n}r: {r['chunks_per_s']:.0f} chunks/s, ttfc p50 {r['ttfc_p50']:.1f} ms, "
            f"cpu {r['server_cpu_percent']} / {r['loadgen_cpu_percent']} %"
        )
        parts.append(text + noise_and_errors(r))
    return "; ".join(parts)


class RuntimeStream:
    """The ``runtime-stream`` scenario."""

    name = "runtime-stream"
    description = (
        "SSE stream of 1,000 chunks, 1 and 50 readers: chunks/s and time to first chunk, "
        "runtime vs raw-ASGI SSE floor and the shipped peers"
    )

    def _count(self, backend: str) -> int:
        return 2 + (len(peers.PEERS) if backend == "asyncio" else 0)

    def steps(self, config: RunConfig) -> int:
        """One step per (backend, repetition, subject); peers on asyncio only."""
        return sum(self._count(b) for b in config.backends) * config.repetitions

    def _timing(self, config: RunConfig) -> tuple[float, float]:
        """Warm-up and measured seconds per reader count: half of a load sample's,
        so one server (two reader counts) takes what one ``runtime-rps`` sample
        does; at least 0.3 s and 0.7 s (``--quick``'s), so that the window
        holds several 1,000-chunk streams of a fast subject."""
        return max(config.warmup / 2, 0.3), max(config.duration / 2, 0.7)

    def run(self, config: RunConfig, progress: Progress) -> ScenarioResult:
        """Measure every (backend, subject) ``config.repetitions`` times."""
        envs: list[peers.PeerEnv] = []
        skipped: dict[str, str] = {}
        if "asyncio" in config.backends:
            envs, skipped = peers.available(progress.note)
        pinning = procs.plan_pinning(config.pin)
        warmup, duration = self._timing(config)
        samples: list[dict[str, Any]] = []
        failures: list[str] = []
        for backend in config.backends:
            subjects: list[ServerSpec] = [BASELINE_SSE, RUNTIME_STREAM]
            if backend == "asyncio":
                subjects += [env.spec(stream=True) for env in envs]
            for rep in range(1, config.repetitions + 1):
                for spec in subjects:
                    progress.start(f"{self.name} {backend} {spec.name} rep {rep}")
                    results: dict[int, dict[str, Any]] = {}
                    with serve_pinned(spec, backend, config, pinning) as server:
                        for readers in READERS:
                            opts = streamgen.Options(
                                port=server.port,
                                body=BODY,
                                readers=readers,
                                chunks=CHUNKS,
                                warmup=warmup,
                                duration=duration,
                                server_pid=server.pid,
                            )
                            results[readers] = procs.run_json(
                                streamgen.command(opts),
                                cpus=pinning.loadgen,
                                timeout=warmup + duration + 30.0,
                            )
                    progress.finish(describe(results))
                    metrics: dict[str, float] = {}
                    for readers, r in results.items():
                        if r["errors"] or not r["chunks"]:
                            failures.append(f"{self.name} {backend} {spec.name} {readers} readers")
                        metrics[f"chunks_per_s@{readers}"] = r["chunks_per_s"]
                        if r["ttfc_samples"]:
                            metrics[f"ttfc_p50@{readers}"] = r["ttfc_p50"]
                            metrics[f"ttfc_p99@{readers}"] = r["ttfc_p99"]
                    samples.append(
                        {
                            "backend": backend,
                            "subject": spec.name,
                            "repetition": rep,
                            "command": spec.command("127.0.0.1:PORT", backend),
                            "startup_seconds": round(server.startup_seconds, 3),
                            "metrics": metrics,
                            "results": {str(n): r for n, r in results.items()},
                        }
                    )
            if backend == "asyncio":
                for rep in range(1, config.repetitions + 1):
                    for label in skipped:
                        progress.start(f"{self.name} asyncio {label} rep {rep}")
                        progress.finish("skipped: not installed (see notes)")
        measures = summarize_measures(self.name, samples, METRICS, baseline=BASELINE_SSE.name)
        values: dict[tuple[str, str], dict[str, Spread]] = {}
        for m in measures:
            values.setdefault((m.backend, m.subject), {})[m.metric] = m.value
        labels = [env.peer.label for env in envs]
        wanted = {m.label: (m.unit, m.digits) for m in METRICS if not m.key.startswith("ttfc_p99")}
        measures += peer_measures(
            self.name, values, (RUNTIME_STREAM.name,), labels, wanted, config.repetitions
        )
        return ScenarioResult(
            name=self.name,
            rows=[],
            samples=samples,
            notes=self._notes(samples, pinning, envs, skipped, warmup, duration),
            measures=measures,
            failures=failures,
            settings={
                "chunks": CHUNKS,
                "readers": list(READERS),
                "body": BODY.decode(),
                "warmup": warmup,
                "duration": duration,
                "pinning": pinning.to_json(),
                "peers": [env.to_json() for env in envs],
                "peers_skipped": list(skipped.values()),
            },
        )

    def _notes(
        self,
        samples: list[dict[str, Any]],
        pinning: procs.Pinning,
        envs: list[peers.PeerEnv],
        skipped: dict[str, str],
        warmup: float,
        duration: float,
    ) -> list[str]:
        results = [r for s in samples for r in s["results"].values()]
        notes = [
            f"pinning: {pinning.to_json()}; {warmup:g} s warm-up and {duration:g} s measured "
            f"per reader count; TTFC from the request's write to the first data event"
        ]
        if results:
            peak = max(r["loadgen_cpu_percent"] for r in results)
            saturated = sum(1 for r in results if r["loadgen_saturated"])
            notes.append(
                f"stream reader CPU at most {peak:.0f} % of a core"
                + (f"; saturated in {saturated} samples (lower bounds)" if saturated else "")
            )
            warm = sum(1 for r in results if r["ttfc_includes_warmup"])
            if warm:
                notes.append(
                    f"in {warm} of {len(results)} samples fewer streams than readers started "
                    "after the warm-up: their TTFC includes the warm-up's streams"
                )
            noise = results_noise_note(results)
            if noise:
                notes.append(noise)
        notes += [f"peer {env.peer.description}: {env.versions}" for env in envs]
        notes += skipped.values()
        return notes


register(RuntimeStream())
