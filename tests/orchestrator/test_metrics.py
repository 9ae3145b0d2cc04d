"""``/metrics`` with prometheus_client: the families, their names and labels, the
scrape-time gauges, the per-template latency, and the sum over a machine's workers."""

from __future__ import annotations

import doctest
import logging
import math
import os
import signal
import time
from pathlib import Path

import anyio
import httpx
import prometheus_client
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from ppio_sandbox.orchestrator import metrics as metrics_module
from ppio_sandbox.orchestrator.metrics import (
    CONTENT_TYPE,
    DEFAULT_LATENCY_BUCKETS,
    CallbackGauge,
    Counter,
    Histogram,
    OrchestratorMetrics,
    merge_expositions,
)

from .conftest import orchestrator


def _render(registry: CollectorRegistry) -> str:
    text = prometheus_client.generate_latest(registry).decode("utf-8")
    assert text.endswith("\n")
    return text


def _samples(text: str | bytes) -> dict[str, str]:
    """Sample lines as {series: value}, checking every line is HELP, TYPE or a sample."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# "):
            assert line.split(" ", 2)[1] in {"HELP", "TYPE"}
            continue
        series, value = line.rsplit(" ", 1)
        assert series not in out, f"duplicate series {series}"
        out[series] = value
    return out


def _types(text: bytes) -> dict[str, str]:
    lines = text.decode().splitlines()
    return {line.split()[2]: line.split()[3] for line in lines if line.startswith("# TYPE")}


# -- the metric classes ----------------------------------------------------------------------------


def test_counter_with_labels_renders_exactly() -> None:
    registry = CollectorRegistry()
    requests = Counter("http_total", "Requests.", ["route", "status"], registry=registry)
    ok = requests.labels("/v1/x", "200")
    ok.inc()
    ok.inc(2)
    requests.labels("/v1/x", 500).inc()
    requests.labels("/v1/x", "500").inc()
    lines = [line for line in _render(registry).splitlines() if "_created" not in line]
    assert lines == [
        "# HELP http_total Requests.",
        "# TYPE http_total counter",
        'http_total{route="/v1/x",status="200"} 3.0',
        'http_total{route="/v1/x",status="500"} 2.0',
    ]


def test_labels_returns_the_same_child_each_time() -> None:
    counter = Counter("c_total", "C.", ["outcome"])
    child = counter.labels("ok")
    assert counter.labels("ok") is child
    assert counter.labels(7) is counter.labels("7")  # an int status and its text: one series
    assert counter.labels(outcome="ok") is child


def test_metrics_register_nowhere_unless_told() -> None:
    before = set(prometheus_client.REGISTRY._names_to_collectors)
    Counter("ppio_nowhere_total", "Not in the global registry.")
    Histogram("ppio_nowhere_seconds", "Nor this.")
    OrchestratorMetrics()
    OrchestratorMetrics()  # twice in one process: each has a registry of its own
    assert set(prometheus_client.REGISTRY._names_to_collectors) == before


def test_unlabelled_counter_and_its_checks() -> None:
    registry = CollectorRegistry()
    counter = Counter("plain_total", "Plain.", registry=registry)
    counter.inc()
    counter.inc(0.5)
    assert _samples(_render(registry))["plain_total"] == "1.5"
    assert counter.value == 1.5
    with pytest.raises(ValueError, match="only be incremented by non-negative"):
        counter.inc(-1)
    labelled = Counter("l_total", "L.", ["a"])
    with pytest.raises(ValueError, match=r"No label names were set|missing label values"):
        labelled.inc()
    with pytest.raises(ValueError, match="Incorrect label count"):
        labelled.labels("x", "y")


def test_label_values_are_escaped() -> None:
    registry = CollectorRegistry()
    counter = Counter("esc_total", "Escapes.", ["v"], registry=registry)
    counter.labels('say "hi"\\now\nthen').inc()
    assert _render(registry).splitlines()[2] == r'esc_total{v="say \"hi\"\\now\nthen"} 1.0'


def test_help_is_escaped_and_an_empty_labelled_metric_renders_only_its_header() -> None:
    registry = CollectorRegistry()
    Counter("h_total", 'Back\\slash and\nnewline, "quotes" kept.', ["a"], registry=registry)
    assert _render(registry).splitlines() == [
        r'# HELP h_total Back\\slash and\nnewline, "quotes" kept.',
        "# TYPE h_total counter",
    ]


def test_callback_gauges_are_evaluated_at_scrape_time() -> None:
    registry = CollectorRegistry()
    depth = [0]
    CallbackGauge("depth", "Depth.", callback=lambda: depth[0], registry=registry)
    two = CallbackGauge("two", "Two labels.", ["a", "b"], registry=registry)
    two.set_function(lambda: {("x", "y"): 1, ("a", "b"): 2})
    unbound = CallbackGauge("unbound", "No callback yet.", registry=registry)
    CallbackGauge("unbound_labelled", "No callback yet.", ["s"], registry=registry)
    depth[0] = 4
    assert _samples(_render(registry)) == {
        "depth": "4.0",
        'two{a="a",b="b"}': "2.0",
        'two{a="x",b="y"}': "1.0",
        "unbound": "0.0",  # an unbound unlabelled gauge reads 0; a labelled one has no series
    }
    depth[0] = 7
    unbound.set_function(lambda: 3)
    assert _samples(_render(registry))["depth"] == "7.0"
    assert _samples(_render(registry))["unbound"] == "3.0"
    assert "# TYPE depth gauge" in _render(registry).splitlines()


def test_a_failing_callback_drops_its_samples_not_the_scrape(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()

    def broken() -> float:
        raise RuntimeError("directory gone")

    CallbackGauge("broken", "Broken.", callback=broken, registry=registry)
    CallbackGauge("wrong_shape", "Labelled, scalar callback.", ["s"], callback=lambda: 1,
                  registry=registry)  # fmt: skip
    CallbackGauge("wrong_arity", "Two labels, one given.", ["a", "b"], registry=registry,
                  callback=lambda: {"x": 1})  # fmt: skip
    Counter("fine_total", "Fine.", registry=registry).inc()
    with caplog.at_level(logging.ERROR):
        samples = _samples(_render(registry))
    assert {k: v for k, v in samples.items() if "_created" not in k} == {"fine_total": "1.0"}
    for name in ("broken", "wrong_shape", "wrong_arity"):
        assert name in caplog.text


def test_histogram_buckets_are_cumulative_and_le_is_inclusive() -> None:
    registry = CollectorRegistry()
    hist = Histogram("lat_seconds", "Latency.", buckets=[0.1, 0.5, 1], registry=registry)
    for value in (0.05, 0.1, 0.3, 0.7, 1.0, 2.0, 100.0):
        hist.observe(value)
    samples = _samples(_render(registry))
    assert samples['lat_seconds_bucket{le="0.1"}'] == "2.0"
    assert samples['lat_seconds_bucket{le="0.5"}'] == "3.0"
    assert samples['lat_seconds_bucket{le="1.0"}'] == "5.0"
    assert samples['lat_seconds_bucket{le="+Inf"}'] == "7.0"
    assert samples["lat_seconds_count"] == "7.0"
    assert math.isclose(float(samples["lat_seconds_sum"]), 104.15)
    # The read view the API's node figures use: per-bucket (not cumulative) counts.
    view = hist.labels()
    assert view is hist
    assert hist.buckets == (0.1, 0.5, 1.0)
    assert view.counts == [2, 1, 2, 2]
    assert view.count == 7
    assert math.isclose(view.sum, 104.15)


def test_labelled_histogram() -> None:
    registry = CollectorRegistry()
    hist = Histogram("h", "H.", ["kind"], buckets=[1.0], registry=registry)
    hist.labels("process").observe(0.5)
    hist.labels("inprocess").observe(3)
    samples = {k: v for k, v in _samples(_render(registry)).items() if "_created" not in k}
    assert samples == {
        'h_bucket{kind="process",le="1.0"}': "1.0",
        'h_bucket{kind="process",le="+Inf"}': "1.0",
        'h_count{kind="process"}': "1.0",
        'h_sum{kind="process"}': "0.5",
        'h_bucket{kind="inprocess",le="1.0"}': "0.0",
        'h_bucket{kind="inprocess",le="+Inf"}': "1.0",
        'h_count{kind="inprocess"}': "1.0",
        'h_sum{kind="inprocess"}': "3.0",
    }
    assert hist.labels("inprocess").counts == [0, 1]


def test_default_latency_buckets_span_1ms_to_60s() -> None:
    hist = Histogram("d", "D.")
    assert hist.buckets == DEFAULT_LATENCY_BUCKETS
    assert hist.buckets[0] == 0.001
    assert hist.buckets[-1] == 60.0
    assert list(hist.buckets) == sorted(set(hist.buckets))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Counter("", "x"), "empty"),
        (lambda: Counter("c", "x", ["__reserved"]), "Reserved label metric name"),
        (lambda: Histogram("h", "x", ["le"]), "Reserved label"),
        (lambda: Histogram("h", "x", buckets=[1, 0.5]), "sorted"),
        (lambda: Histogram("h", "x", buckets=[float("inf")]), "at least two"),
    ],
)
def test_invalid_definitions_are_rejected(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()  # type: ignore[operator]


def test_duplicate_names_are_rejected() -> None:
    registry = CollectorRegistry()
    Counter("x_total", "X.", registry=registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Counter("x_total", "X again.", registry=registry)


def test_special_values() -> None:
    registry = CollectorRegistry()
    values = {"nan": float("nan"), "pinf": float("inf"), "ninf": -float("inf")}
    for name, value in values.items():
        CallbackGauge(name, name, callback=lambda v=value: v, registry=registry)  # type: ignore[misc]
    assert _samples(_render(registry)) == {"nan": "NaN", "pinf": "+Inf", "ninf": "-Inf"}


# -- the orchestrator's families -------------------------------------------------------------------


def test_orchestrator_metrics_render_every_family() -> None:
    metrics = OrchestratorMetrics()
    metrics.bind(session_states=lambda: {"active": 3, "idle": 2}, mailbox_depth=lambda: 5)
    metrics.record_turn("ok", 0.02)
    metrics.record_turn("timeout", 61.0)
    metrics.record_turn("rejected")
    metrics.record_template_turn("echo", 0.02)
    metrics.sandbox_starts_total.labels("process").inc()
    metrics.sandbox_crashes_total.labels("process").inc()
    metrics.http_requests_total.labels("/v1/sessions", 201).inc()
    metrics.checkpoints_total.inc()
    metrics.checkpoint_bytes_total.inc(512)
    metrics.checkpoint_failures_total.labels("store").inc()
    metrics.sessions_restored_total.inc()
    metrics.forwarded_total.labels("ok").inc()
    text = metrics.render()
    samples = _samples(text)
    assert _types(text) == {
        "ppio_sessions": "gauge",
        "ppio_turns_total": "counter",
        "ppio_turn_duration_seconds": "histogram",
        "ppio_template_turn_duration_seconds": "histogram",
        "ppio_sandbox_starts_total": "counter",
        "ppio_sandbox_crashes_total": "counter",
        "ppio_mailbox_depth": "gauge",
        "ppio_http_requests_total": "counter",
        "ppio_checkpoints_total": "counter",
        "ppio_checkpoint_bytes_total": "counter",
        "ppio_checkpoint_failures_total": "counter",
        "ppio_session_restores_total": "counter",
        "ppio_forwarded_total": "counter",
    }
    assert not any("_created" in series for series in samples)  # timestamps: not summable
    assert samples['ppio_sessions{state="active"}'] == "3.0"
    assert samples['ppio_sessions{state="idle"}'] == "2.0"
    assert samples["ppio_mailbox_depth"] == "5.0"
    expected_turns = {"ok": "1.0", "timeout": "1.0", "rejected": "1.0"}
    for outcome in ("ok", "error", "timeout", "cancelled", "crashed", "rejected"):
        assert samples[f'ppio_turns_total{{outcome="{outcome}"}}'] == expected_turns.get(
            outcome, "0.0"
        )
    assert samples['ppio_turn_duration_seconds_bucket{le="0.025"}'] == "1.0"
    assert samples['ppio_turn_duration_seconds_bucket{le="60.0"}'] == "1.0"
    assert samples['ppio_turn_duration_seconds_bucket{le="+Inf"}'] == "2.0"
    assert samples["ppio_turn_duration_seconds_count"] == "2.0"
    assert samples['ppio_template_turn_duration_seconds_count{template="echo"}'] == "1.0"
    assert samples['ppio_sandbox_starts_total{kind="process"}'] == "1.0"
    assert samples['ppio_sandbox_starts_total{kind="inprocess"}'] == "0.0"
    assert samples['ppio_sandbox_crashes_total{kind="process"}'] == "1.0"
    assert samples['ppio_http_requests_total{route="/v1/sessions",status="201"}'] == "1.0"
    assert samples["ppio_checkpoints_total"] == "1.0"
    assert samples["ppio_checkpoint_bytes_total"] == "512.0"
    assert samples['ppio_checkpoint_failures_total{reason="store"}'] == "1.0"
    assert samples['ppio_checkpoint_failures_total{reason="fenced"}'] == "0.0"
    assert samples["ppio_session_restores_total"] == "1.0"
    assert samples['ppio_forwarded_total{outcome="ok"}'] == "1.0"
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    # What the API's node figures read (orchestrator/api.py).
    assert metrics.turns_total.labels("ok").value == 1.0
    assert metrics.turn_duration_seconds.labels().count == 2


def test_orchestrator_metrics_before_binding() -> None:
    samples = _samples(OrchestratorMetrics().render())
    assert samples["ppio_mailbox_depth"] == "0.0"  # an unbound unlabelled gauge reads 0
    assert not any(series.startswith("ppio_sessions") for series in samples)
    assert not any(series.startswith("ppio_template_turn") for series in samples)


def test_template_labels_are_bounded() -> None:
    metrics = OrchestratorMetrics()
    metrics.MAX_TEMPLATES = 3
    for i in range(6):
        metrics.record_template_turn(f"t{i}", 0.01)
    metrics.record_template_turn("t0", 0.01)  # a known one keeps its series
    metrics.record_template_turn("t5", 0.01)  # a late one stays in the overflow series
    counts = {
        series: value
        for series, value in _samples(metrics.render()).items()
        if series.startswith("ppio_template_turn_duration_seconds_count")
    }
    assert counts == {
        'ppio_template_turn_duration_seconds_count{template="t0"}': "2.0",
        'ppio_template_turn_duration_seconds_count{template="t1"}': "1.0",
        'ppio_template_turn_duration_seconds_count{template="t2"}': "1.0",
        'ppio_template_turn_duration_seconds_count{template="_other"}': "4.0",
    }


# -- a machine's workers, summed -------------------------------------------------------------------


def _worker(sessions: dict[str, float], turns: int, seconds: float) -> OrchestratorMetrics:
    metrics = OrchestratorMetrics()
    metrics.bind(session_states=lambda: sessions, mailbox_depth=lambda: turns)
    for _ in range(turns):
        metrics.record_turn("ok", seconds)
        metrics.record_template_turn("echo", seconds)
    metrics.http_requests_total.labels("invocations", 200).inc(turns)
    metrics.checkpoint_failures_total.labels('odd "reason"\n').inc()
    return metrics


def test_merge_sums_every_series_of_the_workers() -> None:
    one = _worker({"ready": 6, "idle": 1}, 2, 0.02)
    two = _worker({"ready": 7}, 3, 0.3)
    merged = merge_expositions([one.render(), two.render()])
    samples = _samples(merged)
    assert samples['ppio_sessions{state="ready"}'] == "13.0"
    assert samples['ppio_sessions{state="idle"}'] == "1.0"
    assert samples["ppio_mailbox_depth"] == "5.0"
    assert samples['ppio_turns_total{outcome="ok"}'] == "5.0"
    assert samples['ppio_turns_total{outcome="error"}'] == "0.0"
    assert samples['ppio_turn_duration_seconds_bucket{le="0.025"}'] == "2.0"
    assert samples['ppio_turn_duration_seconds_bucket{le="0.5"}'] == "5.0"
    assert samples["ppio_turn_duration_seconds_count"] == "5.0"
    assert math.isclose(float(samples["ppio_turn_duration_seconds_sum"]), 0.94)
    assert samples['ppio_template_turn_duration_seconds_count{template="echo"}'] == "5.0"
    assert samples['ppio_http_requests_total{route="invocations",status="200"}'] == "5.0"
    assert samples[r'ppio_checkpoint_failures_total{reason="odd \"reason\"\n"}'] == "2.0"
    # One HELP and TYPE per family, the same types as one worker's, in its order.
    assert _types(merged) == _types(one.render())
    lines = merged.decode().splitlines()
    assert sum(line.startswith("# TYPE ppio_turns_total ") for line in lines) == 1
    assert [f.name for f in text_string_to_metric_families(merged.decode())] == [
        f.name for f in text_string_to_metric_families(one.render().decode())
    ]


def test_merge_leaves_out_what_it_cannot_parse(caplog: pytest.LogCaptureFixture) -> None:
    one = _worker({"ready": 2}, 1, 0.01).render()
    with caplog.at_level(logging.WARNING, "ppio_sandbox.orchestrator.metrics"):
        merged = merge_expositions([one, b'{"error": "not metrics"}\n', one])
    assert _samples(merged)['ppio_sessions{state="ready"}'] == "4.0"
    assert "could not be parsed" in caplog.text
    assert merge_expositions([one]) == one


def test_merge_adds_the_counters_not_the_gauges_of_workers_that_did_not_answer() -> None:
    live = _worker({"ready": 6}, 2, 0.02).render()
    gone = _worker({"ready": 7}, 3, 0.3).render()  # a killed worker's last snapshot
    samples = _samples(merge_expositions([live], carried=[gone]))
    assert samples['ppio_turns_total{outcome="ok"}'] == "5.0"
    assert samples["ppio_turn_duration_seconds_count"] == "5.0"
    assert samples['ppio_sessions{state="ready"}'] == "6.0"  # its sessions are gone
    assert samples["ppio_mailbox_depth"] == "2.0"


def test_a_workers_snapshot_is_what_it_last_rendered(tmp_path: Path) -> None:
    one = OrchestratorMetrics(snapshots=tmp_path / "metrics")
    two = OrchestratorMetrics(snapshots=tmp_path / "metrics")
    assert one.incarnation != two.incarnation
    assert one.carried([]) == []  # nothing rendered yet
    one.record_turn("ok", 0.1)
    text = one.render()
    assert (tmp_path / "metrics" / f"{one.incarnation}.prom").read_bytes() == text
    assert two.carried([]) == [text]
    assert two.carried([one.incarnation]) == []  # it answered: its live text counts
    assert one.carried([]) == []  # never its own
    assert OrchestratorMetrics().carried([]) == []  # not a worker: no snapshots


def test_module_docstring_example_runs() -> None:
    result = doctest.testmod(metrics_module)
    assert result.attempted >= 1
    assert result.failed == 0


# -- a real orchestrator ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_served_orchestrator_counts_turns_per_template(tmp_path: Path) -> None:
    async with orchestrator(tmp_path) as o:
        sid = await o.session()
        template = (await o.client.get(f"/v1/sessions/{sid}")).json()["template_id"]
        assert template.startswith("echo-")  # the deployed template's id: name and digest
        for body in ({"prompt": "a"}, {"action": "sleep", "seconds": 0.3}):
            assert (await o.invoke(sid, body)).status_code == 200
        # Two turns queued behind a third: the actor runs them, and counts them too.
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(o.invoke, sid, {"action": "sleep", "seconds": 0.05})
        r = await o.client.get("/metrics")
        assert r.headers["content-type"] == CONTENT_TYPE
        samples = _samples(r.text)
        per_template = "ppio_template_turn_duration_seconds"
        assert samples[f'{per_template}_count{{template="{template}"}}'] == "5.0"
        # All but the 0.3 s sleep took less than 0.25 s.
        assert samples[f'{per_template}_bucket{{le="0.25",template="{template}"}}'] == "4.0"
        assert samples["ppio_turn_duration_seconds_count"] == "5.0"
        assert samples['ppio_turns_total{outcome="ok"}'] == "5.0"
        assert samples['ppio_sessions{state="ready"}'] == "1.0"
        assert samples['ppio_http_requests_total{route="invocations",status="200"}'] == "5.0"


# -- serve --workers: one scrape, the machine's figures --------------------------------------------


def test_the_machines_counters_survive_a_worker_restart(tmp_path: Path) -> None:
    """Counters live in the workers' files: a worker killed and restarted takes
    nothing away from the machine's sums (which Prometheus would read as a reset)."""
    from tests.e2e.test_orchestrator_serve import serving, template_args
    from tests.e2e.test_workers import _fresh, _worker_pids, _workers_ready

    def scrape(client: httpx.Client) -> dict[str, str]:
        r = client.get("/metrics")
        assert r.status_code == 200, r.text
        return _samples(r.text)

    ok = 'ppio_turns_total{outcome="ok"}'
    invocations = 'ppio_http_requests_total{route="invocations",status="200"}'
    args = [*template_args("counter"), "--workers", "2"]
    with serving(tmp_path, *args, data_dir=tmp_path / "data", tcp="127.0.0.1") as server:
        _workers_ready(server, 2)
        with _fresh(server) as client:
            sids = []
            while {sid.rsplit(".", 1)[1] for sid in sids} != {"w0", "w1"}:
                r = client.post("/v1/sessions", json={"template_id": "counter"})
                assert r.status_code == 201, r.text
                sids.append(r.json()["session_id"])
            for sid in sids:
                r = client.post(f"/v1/sessions/{sid}/invocations", json={})
                assert r.status_code == 200, r.text
            before = scrape(client)
            assert before[ok] == f"{len(sids)}.0"  # whichever worker answers: the sum
            # Counted by each front door that served it: a forwarded turn twice.
            assert float(before[invocations]) >= len(sids)
            assert before["ppio_turn_duration_seconds_count"] == f"{len(sids)}.0"
            assert (tmp_path / "data" / "metrics").is_dir()

            pids = _worker_pids(server)
            os.kill(pids[1], signal.SIGKILL)
            deadline = time.monotonic() + 30
            while _worker_pids(server).get(1) in (None, pids[1]):
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.05)
            _workers_ready(server, 2)
            for _ in range(4):  # whichever worker answers, the new one too
                after = scrape(client)
                assert after[ok] == before[ok]
                assert after[invocations] == before[invocations]
                assert (
                    after["ppio_turn_duration_seconds_count"]
                    == before["ppio_turn_duration_seconds_count"]
                )
            kept = next(sid for sid in sids if sid.endswith(".w0"))
            assert client.post(f"/v1/sessions/{kept}/invocations", json={}).status_code == 200
            assert scrape(client)[ok] == f"{len(sids) + 1}.0"
