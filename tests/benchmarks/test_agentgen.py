"""The agent-hosting load generator (:mod:`benchmarks.agentgen`): its think
times, options and command line, the summaries it shares with the other load
generators (:mod:`benchmarks.loadgen`), and one short real run against an
orchestrator serving ``benchmarks/templates/think`` on both backends."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from benchmarks import agentgen, loadgen, procs
from benchmarks.agentgen import AgentOptions, _parse, _rss_kb, think_ms
from benchmarks.scenarios.agent_hosting import ORCHESTRATOR_THINK, TEMPLATE_ID
from benchmarks.servers import serve

BACKENDS = ["asyncio", "trio"]


def test_think_time_is_decided_by_seed_session_and_turn_alone() -> None:
    first = [think_ms(1, s, t) for s in range(10) for t in range(10)]
    assert first == [think_ms(1, s, t) for s in range(10) for t in range(10)]
    assert first != [think_ms(2, s, t) for s in range(10) for t in range(10)]
    # Sessions and turns each change it: no two sessions march in step.
    assert len({think_ms(1, s, 1) for s in range(100)}) > 50
    assert len({think_ms(1, 0, t) for t in range(100)}) > 50
    assert think_ms(1, 3, 4) != think_ms(1, 4, 3)


def test_think_time_is_uniform_in_its_bounds() -> None:
    values = [think_ms(7, s, t, 50, 500) for s in range(100) for t in range(100)]
    assert min(values) == 50
    assert max(values) == 500
    assert 265 < sum(values) / len(values) < 285  # the mean of [50, 500] is 275
    assert {think_ms(1, s, t, 120, 120) for s in range(5) for t in range(5)} == {120}


def test_the_ideal_is_sessions_over_the_mean_think() -> None:
    opts = AgentOptions(sessions=1000, think_min=50, think_max=500)
    assert opts.mean_think == pytest.approx(0.275)
    assert opts.ideal == pytest.approx(1000 / 0.275)


def test_the_command_line_carries_every_option() -> None:
    opts = AgentOptions(
        port=1234,
        template="t",
        sessions=7,
        chunks=3,
        think_min=10,
        think_max=20,
        seed=9,
        warmup=0.5,
        duration=1.5,
        server_pid=42,
        connect_concurrency=5,
        ramp_timeout=8.0,
    )
    argv = agentgen.command(opts)
    assert argv[1:3] == ["-m", "benchmarks.agentgen"]
    assert _parse(argv[3:]) == opts


@pytest.mark.parametrize(
    "args",
    [
        ["--sessions", "0"],
        ["--think-min", "600"],
        ["--duration", "0"],
        ["--connect-concurrency", "0"],
    ],
)
def test_bad_options_are_refused(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        _parse(["--port", "1", *args])
    assert raised.value.code == 2
    assert "need" in capsys.readouterr().err


def test_latency_stats_in_milliseconds() -> None:
    stats = loadgen.latency_stats([4_000_000, 1_000_000, 2_000_000, 3_000_000])
    assert stats == {"p50": 2.0, "p90": 4.0, "p99": 4.0, "max": 4.0, "mean": 2.5}
    assert loadgen.latency_stats([]) == {
        "p50": 0.0,
        "p90": 0.0,
        "p99": 0.0,
        "max": 0.0,
        "mean": 0.0,
    }


async def _report(usage: loadgen.CpuUsage, **kwargs: bool) -> dict[str, Any]:
    return usage.report(**kwargs)  # names the running event loop: needs one


def test_cpu_report_keys_and_noise() -> None:
    usage = loadgen.CpuUsage(
        loadgen=90.0, server=50.0, server_own=40.0, busy={"0": 80.0, "1": 75.0}
    )
    assert usage.other == pytest.approx(15.0)
    report = asyncio.run(_report(usage))
    assert list(report) == [
        "loadgen_cpu_percent",
        "server_cpu_percent",
        "loadgen_saturated",
        "cpu_busy_percent",
        "other_cpu_percent",
        "loadgen_cpus",
        "event_loop",
    ]
    assert report["loadgen_saturated"] is True
    assert report["event_loop"] == "asyncio"
    assert "server_own_cpu_percent" in asyncio.run(_report(usage, server_own=True))
    assert "cpu_busy_percent" not in asyncio.run(_report(usage, busy=False))
    alone = loadgen.CpuUsage(loadgen=1.0, server=None, server_own=None, busy=None)
    assert alone.other is None
    assert asyncio.run(_report(alone))["server_cpu_percent"] is None


def test_rss_of_a_live_process_and_of_none() -> None:
    kb = _rss_kb(os.getpid())
    assert kb is not None
    assert kb > 1000
    assert _rss_kb(None) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_short_run_against_the_orchestrator(backend: str, tmp_path: Path) -> None:
    with serve(
        ORCHESTRATOR_THINK,
        backend,
        cpus=None,
        logdir=tmp_path,
        startup_timeout=30.0,
        stop_timeout=5.0,
    ) as server:
        opts = AgentOptions(
            port=server.port,
            template=TEMPLATE_ID,
            sessions=8,
            chunks=5,
            think_min=20,
            think_max=60,
            warmup=0.2,
            duration=1.0,
            server_pid=server.pid,
            ramp_timeout=10.0,
        )
        result = procs.run_json(agentgen.command(opts), cpus=None, timeout=30.0)
    assert result["errors"] == 0, result["error_kinds"]
    assert result["ramp_errors"] == {}
    assert result["ready_sessions"] == result["released_in_time"] == 8
    assert result["turns"] > 0
    # 8 sessions of 40 ms mean think: at most 200 turns/s, and not far below.
    assert 0.3 < result["ideal_ratio"] <= 1.05
    assert result["chunks_per_turn"] == 5
    overhead = result["overhead_ms"]
    assert -1 < overhead["p50"] <= overhead["p99"] < 500
    latency = result["latency_ms"]
    assert 20 <= latency["p50"] <= latency["max"]
    assert result["ttfc_overhead_ms"]["p50"] > -1
    assert result["server_rss_steady_kb"] > 0
    assert result["server_cpu_percent"] is not None
    samples = result["turn_samples"]
    assert samples["fields"] == ["think_ms", "latency_ms", "ttfc_ms"]
    assert len(samples["rows"]) == result["turns"]
    # An event loop may end a sleep up to its clock resolution early (asyncio
    # runs timers due within ``clock_resolution``): a turn can beat its think
    # time by a fraction of a millisecond, never by more.
    bad = [row for row in samples["rows"] if not (20 <= row[0] <= 60 and row[1] > row[0] - 1)]
    assert not bad, bad
