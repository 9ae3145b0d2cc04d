"""Shared by the HTTP scenarios: start each subject, drive it with the load
generator in its own pinned process, and describe the result.

:func:`run_pairs`: a subject is measured next to its baseline, alternating
within each repetition, on each backend; each server is a fresh process.

:func:`run_sweep`: the same over several concurrency levels; each
repetition on each backend starts every subject's server once (all pinned
to the server CPU, the idle ones waiting) and, level by level, drives each
in turn.
"""

from __future__ import annotations

import contextlib
import http.client
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .. import loadgen, procs
from ..core import Progress, RunConfig
from ..servers import RunningServer, ServerError, ServerSpec, serve, unix_connection

__all__ = [
    "NOISE_CPU",
    "Subject",
    "SweepScenario",
    "describe",
    "loadgen_note",
    "noise_and_errors",
    "noise_note",
    "results_noise_note",
    "run_pairs",
    "run_sweep",
    "serve_pinned",
]

NOISE_CPU = 10.0
"""CPU % of a core used by other processes above which a sample is called noisy."""


@dataclass(frozen=True)
class Subject:
    """One server to measure and what to send it."""

    label: str
    spec: ServerSpec
    path: str
    churn: str | None = None
    """Template id: run session churn cycles (see :mod:`benchmarks.loadgen`)."""
    prime: bool = False
    """Before measuring, send one request per connection's session id, one
    at a time, so that slow session starts (process sandboxes) are over."""


def serve_pinned(
    spec: ServerSpec, backend: str, config: RunConfig, pinning: procs.Pinning
) -> contextlib.AbstractContextManager[RunningServer]:
    """:func:`~benchmarks.servers.serve` on the server CPU of ``pinning``, with the
    run's log directory and start and stop timeouts."""
    return serve(
        spec,
        backend,
        cpus=pinning.server,
        logdir=config.workdir,
        startup_timeout=config.startup_timeout,
        stop_timeout=config.stop_timeout,
    )


def run_pairs(
    scenario: str,
    subjects: Sequence[Subject],
    config: RunConfig,
    progress: Progress,
    *,
    backends: Sequence[str],
    body: bytes,
    connections: int | None = None,
) -> tuple[list[dict[str, Any]], procs.Pinning]:
    """Measure every (backend, subject) ``config.repetitions`` times; the samples."""
    pinning = procs.plan_pinning(config.pin)
    conns = connections or config.connections
    samples: list[dict[str, Any]] = []
    for backend in backends:
        for rep in range(1, config.repetitions + 1):
            for subject in subjects:
                progress.start(f"{scenario} {backend} {subject.label} rep {rep}")
                with serve_pinned(subject.spec, backend, config, pinning) as server:
                    if subject.prime:
                        _prime(server, subject.path, body, conns, config.startup_timeout)
                    result = _drive(server, subject, config, pinning, body, conns)
                progress.finish(describe(result))
                samples.append(_sample(backend, subject, rep, server, result))
    return samples, pinning


def run_sweep(
    scenario: str,
    subjects: Sequence[Subject],
    config: RunConfig,
    progress: Progress,
    *,
    backends: Sequence[str],
    body: bytes,
    levels: Sequence[int],
) -> tuple[list[dict[str, Any]], procs.Pinning]:
    """Measure every (backend, level, subject) ``config.repetitions`` times; the samples.

    Each sample has ``concurrency`` (the level: connections, and sessions
    where each connection is a session).
    """
    pinning = procs.plan_pinning(config.pin)
    samples: list[dict[str, Any]] = []
    for backend in backends:
        for rep in range(1, config.repetitions + 1):
            with contextlib.ExitStack() as stack:
                servers = [
                    stack.enter_context(serve_pinned(subject.spec, backend, config, pinning))
                    for subject in subjects
                ]
                for level in levels:
                    for subject, server in zip(subjects, servers, strict=True):
                        progress.start(f"{scenario} {backend} {subject.label} c={level} rep {rep}")
                        if subject.prime:
                            _prime(server, subject.path, body, level, config.startup_timeout)
                        result = _drive(server, subject, config, pinning, body, level)
                        progress.finish(describe(result))
                        sample = _sample(backend, subject, rep, server, result)
                        sample["concurrency"] = level
                        samples.append(sample)
    return samples, pinning


def _drive(
    server: RunningServer,
    subject: Subject,
    config: RunConfig,
    pinning: procs.Pinning,
    body: bytes,
    connections: int,
) -> dict[str, Any]:
    """One load-generator run against ``server``: its JSON result."""
    opts = loadgen.Options(
        port=server.port,
        unix=str(server.unix) if server.unix else None,
        path=subject.path,
        body=body,
        connections=connections,
        warmup=config.warmup,
        duration=config.duration,
        server_pid=server.pid,
        churn=subject.churn,
    )
    timeout = config.warmup + config.duration + 30.0
    result: dict[str, Any] = procs.run_json(
        loadgen.command(opts), cpus=pinning.loadgen, timeout=timeout
    )
    return result


def _sample(
    backend: str, subject: Subject, rep: int, server: RunningServer, result: dict[str, Any]
) -> dict[str, Any]:
    return {
        "backend": backend,
        "subject": subject.label,
        "repetition": rep,
        "command": subject.spec.command("127.0.0.1:PORT", backend),
        "path": subject.path,
        "startup_seconds": round(server.startup_seconds, 3),
        "result": result,
    }


def _prime(server: RunningServer, path: str, body: bytes, count: int, timeout: float) -> None:
    """One request per load-generator session id, in turn (each may start a sandbox)."""
    headers = {"Content-Type": "application/json"}
    for index in range(count):
        conn: http.client.HTTPConnection
        if server.unix is not None:
            conn = unix_connection(server.unix, timeout)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
        try:
            conn.request("POST", path, body, {**headers, "X-PPIO-Session-Id": f"bench-{index}"})
            response = conn.getresponse()
            text = response.read()
            if response.status != 200:
                raise ServerError(
                    f"priming session bench-{index}: {response.status} {text[:300]!r}"
                )
        except (OSError, http.client.HTTPException) as exc:
            raise ServerError(f"priming session bench-{index}: {exc}") from None
        finally:
            conn.close()


class SweepScenario:
    """The part the concurrency-sweeping scenarios share: the progress steps and
    the sweep itself, over ``subjects`` at ``levels`` (``quick_levels`` with
    ``--quick``; ``--concurrency`` overrides both) on every backend.

    A subclass sets the class attributes and writes ``run``, calling
    :meth:`sweep` for the samples.
    """

    name: str
    subjects: tuple[Subject, ...]
    levels: tuple[int, ...]
    quick_levels: tuple[int, ...]
    body: bytes

    def steps(self, config: RunConfig) -> int:
        """One step per (backend, repetition, level, subject)."""
        levels = config.sweep(self.levels, self.quick_levels)
        return len(config.backends) * config.repetitions * len(levels) * len(self.subjects)

    def sweep(
        self, config: RunConfig, progress: Progress
    ) -> tuple[Sequence[int], list[dict[str, Any]], procs.Pinning]:
        """:func:`run_sweep` on every backend: the levels swept, the samples, the pinning."""
        levels = config.sweep(self.levels, self.quick_levels)
        samples, pinning = run_sweep(
            self.name,
            self.subjects,
            config,
            progress,
            backends=config.backends,
            body=self.body,
            levels=levels,
        )
        return levels, samples, pinning


def loadgen_note(samples: list[dict[str, Any]]) -> str:
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


def noise_note(samples: list[dict[str, Any]]) -> str | None:
    """A note when other processes used a CPU during measured windows."""
    return results_noise_note([s["result"] for s in samples])


def results_noise_note(results: Sequence[dict[str, Any]]) -> str | None:
    """:func:`noise_note` of load generators' results themselves (not samples)."""
    noisy = [
        r["other_cpu_percent"] for r in results if (r.get("other_cpu_percent") or 0.0) > NOISE_CPU
    ]
    if not noisy:
        return None
    return (
        f"other processes used {min(noisy):.0f}-{max(noisy):.0f} % of a core in "
        f"{len(noisy)} of {len(results)} measured windows: figures are noisy"
    )


def noise_and_errors(result: dict[str, Any]) -> str:
    """The end of a progress line: other processes' CPU when noisy, then the
    errors (empty when neither)."""
    text = ""
    if (result.get("other_cpu_percent") or 0.0) > NOISE_CPU:
        text += f" / other {result['other_cpu_percent']} % (noisy)"
    if result["errors"]:
        text += f", {result['errors']} errors {result['error_kinds']}"
    return text


def describe(result: dict[str, Any]) -> str:
    """The progress line's result: req/s, p99, CPU, noise, errors."""
    unit = "cycles/s" if result.get("mode") == "churn" else "req/s"
    text = (
        f"{result['rps']:.0f} {unit}, p99 {result['p99']:.1f} ms, "
        f"cpu server {result['server_cpu_percent']} % / loadgen {result['loadgen_cpu_percent']} %"
    )
    return text + noise_and_errors(result)
