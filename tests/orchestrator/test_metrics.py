from __future__ import annotations

import doctest
import logging
from collections.abc import Callable

import pytest

from ppio_sandbox.orchestrator import metrics as metrics_module
from ppio_sandbox.orchestrator.metrics import (
    CONTENT_TYPE,
    DEFAULT_LATENCY_BUCKETS,
    Counter,
    Gauge,
    Histogram,
    OrchestratorMetrics,
    Registry,
)


def _lines(registry: Registry) -> list[str]:
    text = registry.render().decode("utf-8")
    assert text.endswith("\n")
    return text.splitlines()


def _samples(registry: Registry) -> dict[str, str]:
    """Sample lines as {series: value}, checking every line is HELP, TYPE or a sample."""
    out: dict[str, str] = {}
    for line in _lines(registry):
        if line.startswith("# "):
            assert line.split(" ", 2)[1] in {"HELP", "TYPE"}
            continue
        series, value = line.rsplit(" ", 1)
        assert series not in out, f"duplicate series {series}"
        out[series] = value
    return out


def test_counter_with_labels_renders_exactly() -> None:
    registry = Registry()
    requests = registry.register(Counter("http_total", "Requests.", ["route", "status"]))
    ok = requests.labels("/v1/x", "200")
    ok.inc()
    ok.inc(2)
    requests.labels("/v1/x", 500).inc()
    requests.labels("/v1/x", "500").inc()
    assert _lines(registry) == [
        "# HELP http_total Requests.",
        "# TYPE http_total counter",
        'http_total{route="/v1/x",status="200"} 3.0',
        'http_total{route="/v1/x",status="500"} 2.0',
    ]


def test_labels_returns_the_same_child_each_time() -> None:
    counter = Counter("c_total", "C.", ["outcome"])
    child = counter.labels("ok")
    assert counter.labels("ok") is child
    assert counter.labels(7) is counter.labels("7")


def test_unlabelled_counter_and_its_checks() -> None:
    registry = Registry()
    counter = registry.register(Counter("plain_total", "Plain."))
    counter.inc()
    counter.inc(0.5)
    assert _samples(registry) == {"plain_total": "1.5"}
    with pytest.raises(ValueError, match="only goes up"):
        counter.inc(-1)
    labelled = Counter("l_total", "L.", ["a"])
    with pytest.raises(ValueError, match=r"use \.labels"):
        labelled.inc()
    with pytest.raises(ValueError, match="takes labels"):
        labelled.labels("x", "y")


def test_label_values_are_escaped() -> None:
    registry = Registry()
    counter = registry.register(Counter("esc_total", "Escapes.", ["v"]))
    counter.labels('say "hi"\\now\nthen').inc()
    assert _lines(registry)[2] == r'esc_total{v="say \"hi\"\\now\nthen"} 1.0'


def test_help_is_escaped_and_empty_labelled_metric_renders_only_its_header() -> None:
    registry = Registry()
    registry.register(Counter("h_total", 'Back\\slash and\nnewline, "quotes" kept.', ["a"]))
    assert _lines(registry) == [
        r'# HELP h_total Back\\slash and\nnewline, "quotes" kept.',
        "# TYPE h_total counter",
    ]


def test_gauge_set_inc_dec() -> None:
    registry = Registry()
    gauge = registry.register(Gauge("g", "G."))
    gauge.set(5)
    gauge.inc()
    gauge.dec(2.5)
    by_state = registry.register(Gauge("gs", "Gs.", ["state"]))
    by_state.labels("idle").set(-1)
    assert _samples(registry) == {"g": "3.5", 'gs{state="idle"}': "-1.0"}
    assert "# TYPE g gauge" in _lines(registry)


def test_gauge_callbacks_are_evaluated_at_scrape_time() -> None:
    registry = Registry()
    depth = [0]
    registry.register(Gauge("depth", "Depth.", callback=lambda: depth[0]))
    two = registry.register(Gauge("two", "Two labels.", ["a", "b"]))
    two.set_function(lambda: {("x", "y"): 1, ("a", "b"): 2})
    depth[0] = 4
    assert _samples(registry) == {
        "depth": "4.0",
        'two{a="a",b="b"}': "2.0",
        'two{a="x",b="y"}': "1.0",
    }
    depth[0] = 7
    assert _samples(registry)["depth"] == "7.0"


def test_a_failing_callback_drops_its_samples_not_the_scrape(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = Registry()

    def broken() -> float:
        raise RuntimeError("directory gone")

    registry.register(Gauge("broken", "Broken.", callback=broken))
    registry.register(Gauge("wrong_shape", "Labelled, scalar callback.", ["s"], callback=lambda: 1))
    registry.register(Counter("fine_total", "Fine.")).inc()
    with caplog.at_level(logging.ERROR):
        assert _samples(registry) == {"fine_total": "1.0"}
    assert "broken" in caplog.text
    assert "wrong_shape" in caplog.text


def test_histogram_buckets_are_cumulative() -> None:
    registry = Registry()
    hist = registry.register(Histogram("lat_seconds", "Latency.", buckets=[0.1, 1, 0.5]))
    for value in (0.05, 0.1, 0.3, 0.7, 1.0, 2.0, 100.0):
        hist.observe(value)
    assert _lines(registry) == [
        "# HELP lat_seconds Latency.",
        "# TYPE lat_seconds histogram",
        'lat_seconds_bucket{le="0.1"} 2',
        'lat_seconds_bucket{le="0.5"} 3',
        'lat_seconds_bucket{le="1.0"} 5',
        'lat_seconds_bucket{le="+Inf"} 7',
        "lat_seconds_sum 104.15",
        "lat_seconds_count 7",
    ]


def test_labelled_histogram() -> None:
    registry = Registry()
    hist = registry.register(Histogram("h", "H.", ["kind"], buckets=[1.0]))
    hist.labels("process").observe(0.5)
    hist.labels("inprocess").observe(3)
    assert _samples(registry) == {
        'h_bucket{kind="inprocess",le="1.0"}': "0",
        'h_bucket{kind="inprocess",le="+Inf"}': "1",
        'h_sum{kind="inprocess"}': "3.0",
        'h_count{kind="inprocess"}': "1",
        'h_bucket{kind="process",le="1.0"}': "1",
        'h_bucket{kind="process",le="+Inf"}': "1",
        'h_sum{kind="process"}': "0.5",
        'h_count{kind="process"}': "1",
    }


def test_default_latency_buckets_span_1ms_to_60s() -> None:
    hist = Histogram("d", "D.")
    assert hist.buckets == DEFAULT_LATENCY_BUCKETS
    assert hist.buckets[0] == 0.001
    assert hist.buckets[-1] == 60.0
    assert list(hist.buckets) == sorted(set(hist.buckets))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Counter("bad-name", "x"), "invalid metric name"),
        (lambda: Counter("c", "x", ["bad-label"]), "invalid label name"),
        (lambda: Counter("c", "x", ["__reserved"]), "invalid label name"),
        (lambda: Counter("c", "x", ["a", "a"]), "repeated label"),
        (lambda: Histogram("h", "x", ["le"]), "reserved"),
        (lambda: Histogram("h", "x", buckets=[1, 1]), "distinct"),
        (lambda: Histogram("h", "x", buckets=[float("inf")]), "distinct"),
    ],
)
def test_invalid_definitions_are_rejected(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_duplicate_names_are_rejected() -> None:
    registry = Registry()
    registry.register(Counter("x_total", "X."))
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Gauge("x_total", "X again."))


def test_special_values() -> None:
    registry = Registry()
    for name, value in (("nan", float("nan")), ("pinf", float("inf")), ("ninf", -float("inf"))):
        registry.register(Gauge(name, name)).set(value)
    assert _samples(registry) == {"nan": "NaN", "pinf": "+Inf", "ninf": "-Inf"}


def test_orchestrator_metrics_render_every_family() -> None:
    metrics = OrchestratorMetrics()
    metrics.bind(session_states=lambda: {"active": 3, "idle": 2}, mailbox_depth=lambda: 5)
    metrics.record_turn("ok", 0.02)
    metrics.record_turn("timeout", 61.0)
    metrics.record_turn("rejected")
    metrics.sandbox_starts_total.labels("process").inc()
    metrics.sandbox_crashes_total.labels("process").inc()
    metrics.http_requests_total.labels("/v1/sessions", 201).inc()
    samples = _samples(metrics.registry)
    lines = metrics.render().decode().splitlines()
    types = {line.split()[2]: line.split()[3] for line in lines if line.startswith("# TYPE")}
    assert types == {
        "ppio_sessions": "gauge",
        "ppio_turns_total": "counter",
        "ppio_turn_duration_seconds": "histogram",
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
    assert samples['ppio_sessions{state="active"}'] == "3.0"
    assert samples['ppio_sessions{state="idle"}'] == "2.0"
    assert samples["ppio_mailbox_depth"] == "5.0"
    expected_turns = {"ok": "1.0", "timeout": "1.0", "rejected": "1.0"}
    for outcome in ("ok", "error", "timeout", "cancelled", "crashed", "rejected"):
        assert samples[f'ppio_turns_total{{outcome="{outcome}"}}'] == expected_turns.get(
            outcome, "0.0"
        )
    assert samples['ppio_turn_duration_seconds_bucket{le="0.025"}'] == "1"
    assert samples['ppio_turn_duration_seconds_bucket{le="60.0"}'] == "1"
    assert samples['ppio_turn_duration_seconds_bucket{le="+Inf"}'] == "2"
    assert samples["ppio_turn_duration_seconds_count"] == "2"
    assert samples['ppio_sandbox_starts_total{kind="process"}'] == "1.0"
    assert samples['ppio_sandbox_starts_total{kind="inprocess"}'] == "0.0"
    assert samples['ppio_sandbox_crashes_total{kind="process"}'] == "1.0"
    assert samples['ppio_http_requests_total{route="/v1/sessions",status="201"}'] == "1.0"
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_orchestrator_metrics_before_binding() -> None:
    samples = _samples(OrchestratorMetrics().registry)
    assert "ppio_mailbox_depth" in samples  # an unbound unlabelled gauge reads 0
    assert not any(series.startswith("ppio_sessions") for series in samples)


def test_module_docstring_example_runs() -> None:
    result = doctest.testmod(metrics_module)
    assert result.attempted >= 1
    assert result.failed == 0
