"""Every report has a plot, and says how to read ``ok``/``MISS``.

A scenario that does not sweep (``runtime-rps`` run alone) fills no series;
its report still gets one PNG: the summary of its tables. Synthetic results,
no load.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import environment, report
from benchmarks.core import Bound, Metric, RunConfig, ScenarioResult, summarize, summarize_measures

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _sample(backend: str, subject: str, rep: int, rps: float) -> dict[str, object]:
    return {
        "backend": backend,
        "subject": subject,
        "repetition": rep,
        "result": {
            "rps": rps,
            "p50": 1.0,
            "p99": 3.0,
            "errors": 0,
            "loadgen_cpu_percent": 20.0,
            "server_cpu_percent": 99.0,
            "other_cpu_percent": 1.0,
            "connections": 64,
        },
    }


def _flat_rows_result() -> ScenarioResult:
    """What runtime-rps alone gives: rows at one concurrency, no series."""
    samples = [
        _sample(backend, subject, rep, rps)
        for backend in ("asyncio", "trio")
        for rep in (1, 2)
        for subject, rps in (("hello-asgi", 10_000.0 + rep), ("runtime", 9_000.0 - rep))
    ]
    rows = summarize("runtime-rps", samples, baseline="hello-asgi", targets=None)
    return ScenarioResult("runtime-rps", rows, samples)


def _measures_only_result() -> ScenarioResult:
    figures = [
        {"backend": "asyncio", "subject": s, "metrics": {"p50": v, "rate": r}}
        for s, v, r in (("python -c pass", 20.0, 50.0), ("warm pool", 2.0, 400.0))
    ]
    metrics = [
        Metric("p50", "creation p50", "ms", digits=1, target=Bound("<=", 0.5, on="ratio")),
        Metric("rate", "creations/s", "/s"),
    ]
    measures = summarize_measures("creation", figures, metrics, baseline="python -c pass")
    return ScenarioResult("creation", [], figures, measures=measures)


def _meta() -> dict[str, object]:
    return {
        "command": "python -m benchmarks run --scenario runtime-rps --report out",
        "started": "2026-01-01T00:00:00+00:00",
        "seconds": 3.0,
        "machine": environment.machine(),
        "packages": environment.packages(),
        "config": RunConfig.make(quick=True).to_json(),
    }


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (_flat_rows_result(), "plots/runtime-rps-summary.png"),
        (_measures_only_result(), "plots/creation-summary.png"),
    ],
    ids=["rows-without-sweep", "measures-only"],
)
def test_a_scenario_without_series_gets_its_summary_plot(
    tmp_path: Path, result: ScenarioResult, expected: str
) -> None:
    pytest.importorskip("matplotlib")
    assert not result.series
    path = report.write_report(tmp_path, [result], _meta())
    pngs = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    assert pngs == [expected]
    assert (tmp_path / expected).read_bytes().startswith(PNG_MAGIC)
    text = path.read_text()
    assert "## Plots" in text
    assert f"]({expected})" in text


def test_a_scenario_with_nothing_measured_draws_nothing(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = report.write_report(tmp_path, [ScenarioResult("empty", [], [])], _meta())
    assert not list(tmp_path.rglob("*.png"))
    assert "## Plots" not in path.read_text()


def test_the_header_explains_ok_and_miss_before_the_tables() -> None:
    text = report.markdown([_measures_only_result()], _meta())
    explained = text.index("`ok` means the row met the target")
    assert "`MISS` that it did not" in text
    assert "not a failed run" in text
    assert explained < text.index("| scenario |")  # read before the tables
    assert "**MISS** (ratio <= 0.5)" in text or "ok (ratio <= 0.5)" in text
