"""The benchmark harness itself: command line, report, plots, progress, child processes.

Nothing here runs load: results are synthetic, processes are tiny.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks import ROOT, environment, plots, procs, report
from benchmarks.__main__ import main
from benchmarks.core import (
    Bound,
    Metric,
    Progress,
    RunConfig,
    ScenarioResult,
    Series,
    concurrency_series,
    summarize,
    summarize_measures,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _loadgen_result(rps: float, p50: float, p99: float, connections: int) -> dict[str, Any]:
    return {
        "rps": rps,
        "p50": p50,
        "p99": p99,
        "errors": 0,
        "loadgen_cpu_percent": 10.0,
        "server_cpu_percent": 99.0,
        "other_cpu_percent": 1.0,
        "connections": connections,
    }


def _sweep_samples() -> list[dict[str, Any]]:
    """Two backends, a baseline and a subject, at 1 and 64 connections, 2 repetitions."""
    samples = []
    for backend, speed in (("asyncio", 2.0), ("trio", 1.0)):
        for level in (1, 64):
            for rep in (1, 2):
                for subject, share in (("baseline", 1.0), ("orchestrator", 0.5)):
                    rps = 1000.0 * speed * share + rep
                    samples.append(
                        {
                            "backend": backend,
                            "subject": subject,
                            "repetition": rep,
                            "concurrency": level,
                            "result": _loadgen_result(rps, level / rps * 1e3, 2 * level, level),
                        }
                    )
    return samples


def _synthetic_results() -> list[ScenarioResult]:
    rows = summarize("sweep", _sweep_samples(), baseline="baseline", targets=None)
    memory = Series("memory", "RSS growth vs sessions", "sessions", "MiB", x_log=True)
    for count, mib in ((10_000, 10.0), (100_000, 110.0)):
        memory.line("asyncio orchestrator", group="orchestrator").add(count, mib, mib - 1, mib + 1)
    figures = [
        {"backend": "asyncio", "subject": s, "metrics": {"rss": v}}
        for s, v in (("task", 9000.0), ("orchestrator", 1100.0))
    ]
    measures = summarize_measures(
        "memory",
        figures,
        [Metric("rss", "RSS bytes/session", "B", target=Bound("<=", 4096))],
        baseline="task",
    )
    return [
        ScenarioResult(
            "sweep", rows, _sweep_samples(), notes=["synthetic"], series=concurrency_series(rows)
        ),
        ScenarioResult("memory", [], figures, measures=measures, series=[memory]),
    ]


def _meta() -> dict[str, Any]:
    return {
        "command": "python -m benchmarks run --quick",
        "started": "2026-01-01T00:00:00+00:00",
        "seconds": 12.0,
        "machine": environment.machine(),
        "packages": environment.packages(),
        "config": RunConfig.make(quick=True).to_json(),
    }


def test_list_names_every_scenario() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    names = {line.split("\t")[0] for line in proc.stdout.splitlines()}
    expected = {
        "orchestrator-rps",
        "orchestrator-process",
        "session-churn",
        "idle-sessions",
        "process-sandbox",
    }
    assert expected <= names


def test_summarize_takes_ratios_at_the_same_concurrency() -> None:
    rows = summarize("sweep", _sweep_samples(), baseline="baseline", targets=None)
    assert len(rows) == 8  # 2 backends x 2 levels x 2 subjects
    subject = {(r.backend, r.concurrency): r for r in rows if r.subject == "orchestrator"}
    assert subject[("asyncio", 64)].rps.median == pytest.approx(1001.5)
    assert subject[("asyncio", 64)].rps_ratio == pytest.approx(1001.5 / 2001.5)
    assert subject[("trio", 1)].p99_ratio == pytest.approx(1.0)


def test_concurrency_series_has_a_line_per_backend_and_subject() -> None:
    rows = summarize("sweep", _sweep_samples(), baseline="baseline", targets=None)
    throughput, latency = concurrency_series(rows)
    assert [line.label for line in throughput.lines] == [
        "asyncio baseline",
        "asyncio orchestrator",
        "trio baseline",
        "trio orchestrator",
    ]
    assert [p.x for p in throughput.lines[0].points] == [1, 64]
    p50 = latency.line("trio orchestrator p50")
    assert p50.dashed
    assert p50.group == latency.line("trio orchestrator p99").group


def test_report_writes_markdown_and_linked_pngs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = report.write_report(tmp_path, _synthetic_results(), _meta())
    text = path.read_text()
    assert path.name == "RESULTS.md"
    assert "| sweep | asyncio | orchestrator | 64 |" in text
    assert "RSS bytes/session" in text
    assert "## Plots" in text
    pngs = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    assert pngs == [
        "plots/memory-memory.png",
        "plots/sweep-latency.png",
        "plots/sweep-throughput.png",
    ]
    for name in pngs:
        assert f"]({name})" in text
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)


def test_report_without_matplotlib_says_so_and_draws_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    assert "matplotlib is not installed" in (plots.missing() or "")
    path = report.write_report(tmp_path, _synthetic_results(), _meta())
    assert "Plots not drawn: matplotlib is not installed" in path.read_text()
    assert not list(tmp_path.rglob("*.png"))


def test_json_has_machine_versions_config_series_and_raw_samples(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    report.write_json(out, _synthetic_results(), _meta())
    data = json.loads(out.read_text())
    machine = data["machine"]
    assert machine["cpu_count"] >= 1
    assert {"cpu_model", "memory_bytes", "kernel"} <= set(machine)
    assert {"python", "ppio-agent-runtime", "anyio", "trio", "hypercorn", "uvloop"} <= set(
        data["packages"]
    )
    assert {"httpx", "msgspec", "matplotlib"} <= set(data["packages"])
    assert data["config"]["quick"] is True
    sweep = data["scenarios"][0]
    assert len(sweep["samples"]) == 16
    assert sweep["series"][0]["lines"][0]["points"][0]["x"] == 1


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_prints_plain_lines_when_not_a_terminal() -> None:
    out, clock = io.StringIO(), _Clock()
    progress = Progress(3, out, clock=clock)
    assert not progress.tty
    progress.begin("a", 3)
    for label in ("one", "two"):
        progress.start(label)
        clock.now += 10.0
        progress.finish("ok")
    progress.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "[1/3 0:00 ETA ?] one ... ok (10.0 s)",
        "[2/3 0:10 ETA 0:20] two ... ok (10.0 s)",
    ]
    assert "\r" not in out.getvalue()
    assert "\x1b" not in out.getvalue()


def test_progress_eta_weighs_the_current_scenario() -> None:
    clock = _Clock()
    progress = Progress(6, io.StringIO(), clock=clock)
    progress.begin("slow", 2)
    progress.start("s1")
    clock.now += 30.0
    progress.finish("ok")
    progress.start("s2")
    clock.now += 30.0
    progress.finish("ok")
    progress.begin("fast", 4)
    progress.start("f1")
    clock.now += 2.0
    progress.finish("ok")
    # 3 fast steps left at the fast scenario's mean, not the run's.
    assert progress.eta() == pytest.approx(6.0)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_one_status_line_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm")
    out = _Terminal()
    with Progress(2, out, refresh=0.01) as progress:
        assert progress.tty
        progress.start("orchestrator-rps asyncio orchestrator c=1 rep 1")
        deadline = time.monotonic() + 5
        while out.getvalue().count("\r\x1b[K") < 3 and time.monotonic() < deadline:
            time.sleep(0.01)  # the ticker redraws the status line on its own
        progress.finish("1000 req/s")
    text = out.getvalue()
    assert text.count("\r\x1b[K") >= 3
    assert "[1/2] orchestrator-rps asyncio orchestrator c=1 rep 1 ... 1000 req/s" in text
    assert text.endswith("\r\x1b[K")  # closed: the status line is cleared


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--quick", "--full"],
        ["run", "--concurrency", "0,4"],
        ["run", "--concurrency", "a"],
    ],
)
def test_run_rejects_bad_options(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_run_rejects_unknown_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--scenario", "nope"]) == 2
    assert "unknown scenario 'nope'" in capsys.readouterr().err


def test_quick_and_full_pick_their_sweep_levels() -> None:
    assert RunConfig.make(quick=True).sweep((1, 4, 16), (1, 16)) == (1, 16)
    assert RunConfig.make(quick=False).sweep((1, 4, 16), (1, 16)) == (1, 4, 16)
    assert RunConfig.make(quick=True, levels=(8,)).sweep((1,), (1,)) == (8,)
    assert RunConfig.make(quick=False, full=True).full


_FORKS_A_STRAY = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                         start_new_session=True)
print(child.pid, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in (b"Z", b"X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_stop_kills_descendants_the_process_leaves_behind() -> None:
    proc = procs.spawn([sys.executable, "-c", _FORKS_A_STRAY], cpus=None, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    stray = int(proc.stdout.readline())
    try:
        assert _alive(stray)
        assert proc.pid in procs.live()
        procs.stop(proc, timeout=5.0)  # SIGTERM: the parent dies, its child would not
        deadline = time.monotonic() + 5
        while _alive(stray) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not _alive(stray)
        assert proc.pid not in procs.live()
    finally:
        proc.stdout.close()
        if _alive(stray):
            os.kill(stray, signal.SIGKILL)


def test_stop_all_kills_what_is_left() -> None:
    proc = procs.spawn([sys.executable, "-c", "import time; time.sleep(60)"], cpus=None)
    assert procs.stop_all() == [proc.pid]
    assert proc.returncode == -signal.SIGKILL
    assert procs.live() == []
