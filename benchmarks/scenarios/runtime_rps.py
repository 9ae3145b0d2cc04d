"""``runtime-rps``: throughput and latency of ``POST /invocations``.

The example agent on the runtime against a bare raw-ASGI hello world on the
same hypercorn settings and event loop, on each backend; on asyncio also
the runtime's fast server option (``server="uvicorn"``) against the hello
world on uvicorn, and the shipped peers (``ppio-sandbox`` 2.1.0 and
``bedrock-agentcore``, each from its own virtual environment, see
:mod:`benchmarks.peers`) serving the same trivial agent as they ship. All
subjects of a backend alternate within each repetition. Targets: runtime
req/s >= 0.9 x its server's hello world, p99 <= 1.5 x; peers are reported
against the hypercorn hello world, and the runtime against each peer.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from .. import peers
from ..core import Measure, Progress, Row, RunConfig, ScenarioResult, Spread, Targets, summarize
from ..servers import BASELINE, BASELINE_UVICORN, RUNTIME, RUNTIME_UVICORN
from . import register
from ._loadtest import Subject, loadgen_note, noise_note, run_pairs

__all__ = ["RuntimeRps", "peer_measures"]

BODY = b'{"query":"hello"}'
TARGETS = Targets(min_rps_ratio=0.9, max_p99_ratio=1.5)

PAIRED = {RUNTIME_UVICORN.name: BASELINE_UVICORN.name}
"""Subjects whose ratios are to another baseline than ``baseline``."""


def uvicorn_note() -> str:
    """Which HTTP parser and loop uvicorn picks here (``auto``)."""
    http = "httptools" if importlib.util.find_spec("httptools") else "h11 (httptools not installed)"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return (
        f"uvicorn rows (ours): http {http}, loop {loop}; "
        "ratios of runtime-uvicorn are to baseline-uvicorn"
    )


def _rekey(rows: list[Row], subject: str, baseline: str) -> None:
    """Ratios of ``subject`` rows to ``baseline`` on the same backend."""
    bases = {row.backend: row for row in rows if row.subject == baseline}
    for row in rows:
        base = bases.get(row.backend)
        if row.subject != subject or base is None:
            continue
        row.rps_ratio = row.rps.median / base.rps.median if base.rps.median else None
        row.p99_ratio = row.p99.median / base.p99.median if base.p99.median else None


def peer_measures(
    scenario: str,
    values: dict[tuple[str, str], dict[str, Spread]],
    ours: tuple[str, ...],
    theirs: list[str],
    metrics: dict[str, tuple[str, int]],
    repetitions: int,
) -> list[Measure]:
    """Our subjects against each peer: ``values[(backend, subject)][metric]``.

    ``metrics`` maps a metric label to its unit and digits. A peer runs on
    asyncio only, so only our asyncio figures are compared (trio's cost shows
    in its ratio to its own baseline).
    """
    out: list[Measure] = []
    for (backend, subject), figures in values.items():
        if subject not in ours or backend != "asyncio":
            continue
        for peer in theirs:
            theirs_figures = values.get(("asyncio", peer))
            if theirs_figures is None:
                continue
            for label, (unit, digits) in metrics.items():
                mine, other = figures.get(label), theirs_figures.get(label)
                if mine is None or other is None:
                    continue
                out.append(
                    Measure(
                        scenario=scenario,
                        backend=backend,
                        subject=subject,
                        metric=label,
                        unit=unit,
                        value=mine,
                        repetitions=repetitions,
                        digits=digits,
                        baseline=peer,
                        ratio=mine.median / other.median if other.median else None,
                    )
                )
    return out


class RuntimeRps:
    """The ``runtime-rps`` scenario."""

    name = "runtime-rps"
    description = (
        "POST /invocations req/s, p50, p99: runtime (hypercorn, uvicorn) vs raw-ASGI "
        "hello world on the same server, and vs the shipped peers"
    )
    subjects = (
        Subject("baseline", BASELINE, "/invocations"),
        Subject("runtime", RUNTIME, "/invocations"),
    )
    uvicorn_subjects = (
        Subject("baseline-uvicorn", BASELINE_UVICORN, "/invocations"),
        Subject("runtime-uvicorn", RUNTIME_UVICORN, "/invocations"),
    )

    def _count(self, backend: str) -> int:
        if backend != "asyncio":
            return len(self.subjects)
        return len(self.subjects) + len(self.uvicorn_subjects) + len(peers.PEERS)

    def steps(self, config: RunConfig) -> int:
        """One step per (backend, repetition, subject); uvicorn and peers on asyncio only."""
        return sum(self._count(b) for b in config.backends) * config.repetitions

    def run(self, config: RunConfig, progress: Progress) -> ScenarioResult:
        """Measure every (backend, subject) pair ``config.repetitions`` times."""
        envs: list[peers.PeerEnv] = []
        skipped: dict[str, str] = {}
        if "asyncio" in config.backends:
            envs, skipped = peers.available(progress.note)
        samples: list[dict[str, Any]] = []
        pinning = None
        for backend in config.backends:
            subjects = list(self.subjects)
            if backend == "asyncio":
                subjects += self.uvicorn_subjects
                subjects += [Subject(env.peer.label, env.spec(), "/invocations") for env in envs]
            found, pinning = run_pairs(
                self.name, subjects, config, progress, backends=[backend], body=BODY
            )
            samples += found
            if backend == "asyncio":
                for rep in range(1, config.repetitions + 1):
                    for label in skipped:
                        progress.start(f"{self.name} asyncio {label} rep {rep}")
                        progress.finish("skipped: not installed (see notes)")
        rows = summarize(self.name, samples, baseline=BASELINE.name, targets=TARGETS)
        for subject, baseline in PAIRED.items():
            _rekey(rows, subject, baseline)
        labels = [env.peer.label for env in envs]
        for row in rows:
            if row.subject in labels or row.subject in PAIRED.values():
                row.targets = None
                if row.subject in PAIRED.values():
                    row.rps_ratio = row.p99_ratio = None
        values = {(r.backend, r.subject): {"req/s": r.rps, "p99": r.p99} for r in rows}
        measures = peer_measures(
            self.name,
            values,
            (RUNTIME.name, RUNTIME_UVICORN.name),
            labels,
            {"req/s": ("req/s", 0), "p99": ("ms", 2)},
            config.repetitions,
        )
        notes = [f"pinning: {pinning.to_json() if pinning else None}"]
        if samples:
            notes.append(loadgen_note(samples))
        noise = noise_note(samples) if samples else None
        if noise:
            notes.append(noise)
        if "asyncio" in config.backends:
            notes.append(uvicorn_note())
            notes += [f"peer {env.peer.description}: {env.versions}" for env in envs]
            notes += skipped.values()
        return ScenarioResult(
            name=self.name,
            rows=rows,
            samples=samples,
            notes=notes,
            measures=measures,
            settings={
                "body": BODY.decode(),
                "targets": {"min_rps_ratio": 0.9, "max_p99_ratio": 1.5},
                "pinning": pinning.to_json() if pinning else None,
                "peers": [env.to_json() for env in envs],
                "peers_skipped": list(skipped.values()),
            },
        )


register(RuntimeRps())
