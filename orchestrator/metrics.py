"""The orchestrator's Prometheus metrics, kept with ``prometheus_client``.

Each orchestrator has a :class:`~prometheus_client.CollectorRegistry` of its
own (never the library's global ``REGISTRY``: one process may run several
orchestrators, as the tests do), rendered in the text exposition format 0.0.4
for ``GET /metrics``. The families, by name:

- ``ppio_sessions{state}`` -- sessions by state, read from the directory at scrape time;
- ``ppio_mailbox_depth`` -- the queue depth: turns waiting in all session mailboxes;
- ``ppio_turns_total{outcome}``, ``ppio_turn_duration_seconds`` -- turns and their latency;
- ``ppio_template_turn_duration_seconds{template}`` -- the same latency per template, with
  at most :attr:`OrchestratorMetrics.MAX_TEMPLATES` templates labelled (the rest share
  ``template="_other"``, which no template id can be): tenants upload templates, and a
  label per upload would grow without bound;
- ``ppio_sandbox_starts_total{kind}``, ``ppio_sandbox_crashes_total{kind}``;
- ``ppio_http_requests_total{route,status}`` (``route`` is a fixed set of names, never an id);
- ``ppio_checkpoints_total``, ``ppio_checkpoint_bytes_total``,
  ``ppio_checkpoint_failures_total{reason}``, ``ppio_session_restores_total``;
- ``ppio_forwarded_total{outcome}`` -- requests sent on to the node owning their session.

The ``*_created`` series ``prometheus_client`` adds to counters and histograms
are left out: they are timestamps, which the summing below would make nonsense
of, and Prometheus does not need them for ``rate()``.

Several workers on one machine (``serve --workers N``) answer one scrape
with the machine's figures: the worker a scrape reaches asks the others for
their own exposition (``/metrics?local=1``, 5 s at most) and
:func:`merge_expositions` adds them up (parsed with ``prometheus_client``'s
parser). Summed counters must never go down, or Prometheus reads a reset of
the whole sum (``rate()`` would spike by everything every worker ever
counted); a killed worker's successor starts from 0, and a worker may not
answer in time. So each worker, whenever it renders its exposition, also
writes it to ``<data dir>/metrics/<incarnation>.prom`` (the supervisor
empties that directory at start), and a scrape adds the counters and
histograms of every file whose worker did not answer it (dead, restarted, or
slow): all a worker ever reported is in its file, so the sum only grows
(the increments of a crashed worker after its last scrape are lost, never
taken back). Gauges (sessions by state, queued turns) are live state: only
the workers that answered add theirs.

``prometheus_client``'s multiprocess mode (every value an mmap'd file) would
keep a dead worker's counts too, but it is process-wide (read at import: no
registry per orchestrator, as the tests need), has no scrape-time gauges,
and writes a file on every increment: measured, it added about 9 µs per
request (counter and histogram writes under a lock) to a ~50 µs front door.

The hot path resolves a labelled child once (``labels(...)`` is a dict hit
after the first call; keep the child for speed) and increments it under
``prometheus_client``'s lock.

>>> metrics = OrchestratorMetrics()
>>> metrics.record_turn("ok", 0.02)
>>> lines = metrics.render().decode().splitlines()
>>> [line for line in lines if line.startswith("ppio_turns_total")][:2]
['ppio_turns_total{outcome="ok"} 1.0', 'ppio_turns_total{outcome="error"} 0.0']
"""

from __future__ import annotations

import logging
import math
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_LATENCY_BUCKETS",
    "CallbackGauge",
    "Counter",
    "Histogram",
    "OrchestratorMetrics",
    "merge_expositions",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
INCARNATION_HEADER = "x-ppio-metrics-incarnation"
"""Names the worker process whose exposition a ``/metrics`` reply is (module docstring)."""
DEFAULT_LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

logger = logging.getLogger(__name__)

GaugeCallback = Callable[[], float | Mapping[Any, float]]
"""A scrape-time gauge value: a number, or ``{label value or tuple of them: number}``."""


class Counter(prometheus_client.Counter):
    """``prometheus_client.Counter``, registered nowhere unless told, with a cheaper
    ``labels`` (a dict hit on the values as given, e.g. an int status) and ``value``."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        *,
        registry: CollectorRegistry | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, documentation, labelnames, registry=registry, **kwargs)
        self._by_values: dict[tuple[object, ...], Counter] = {}

    def labels(self, *values: object, **kwargs: object) -> Counter:
        child = self._by_values.get(values) if not kwargs else None
        if child is None:
            child = super().labels(*values, **kwargs)
            if not kwargs:
                self._by_values[values] = child
        return child

    @property
    def value(self) -> float:
        """The count of this (unlabelled or child) series."""
        for family in self.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    return float(sample.value)
        return 0.0


class Histogram(prometheus_client.Histogram):
    """``prometheus_client.Histogram``, registered nowhere unless told, with the read
    view the API's node figures use: ``buckets``, ``counts``, ``sum``, ``count``."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        *,
        registry: CollectorRegistry | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("buckets", DEFAULT_LATENCY_BUCKETS)
        super().__init__(name, documentation, labelnames, registry=registry, **kwargs)
        self._by_values: dict[tuple[object, ...], Histogram] = {}

    def labels(self, *values: object, **kwargs: object) -> Histogram:
        """The child for these values; an unlabelled histogram with none is itself."""
        if not values and not kwargs and not self._labelnames:
            return self
        child = self._by_values.get(values) if not kwargs else None
        if child is None:
            child = super().labels(*values, **kwargs)
            if not kwargs:
                self._by_values[values] = child
        return child

    @property
    def buckets(self) -> tuple[float, ...]:
        """The finite upper bounds (``counts`` has one more slot: +Inf)."""
        return tuple(b for b in self._upper_bounds if not math.isinf(b))

    def _read(self) -> tuple[list[int], float]:
        cumulative: list[float] = []
        total = 0.0
        for family in self.collect():
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    cumulative.append(sample.value)
                elif sample.name.endswith("_sum"):
                    total = sample.value
        counts = [int(c - (cumulative[i - 1] if i else 0.0)) for i, c in enumerate(cumulative)]
        return counts, total

    @property
    def counts(self) -> list[int]:
        """Observations per bucket (not cumulative), the last one above every bound."""
        return self._read()[0]

    @property
    def sum(self) -> float:
        """The sum of all observations."""
        return self._read()[1]

    @property
    def count(self) -> int:
        """How many observations."""
        return sum(self._read()[0])


class CallbackGauge:
    """A gauge computed by a callback at scrape time (labelled or not).

    The callback returns a number, or for a labelled gauge ``{value: n}`` (one
    label) or ``{(v1, v2): n}``. One that raises, or answers in the wrong
    shape, drops its own samples (logged), not the whole scrape. Unbound
    (no callback), an unlabelled gauge reads 0 and a labelled one has no series.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        callback: GaugeCallback | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._callback = callback
        if registry is not None:
            registry.register(self)

    def set_function(self, callback: GaugeCallback | None) -> None:
        """Compute the value(s) with ``callback`` from now on."""
        self._callback = callback

    def describe(self) -> Iterable[Metric]:
        """The family without samples (so registering never calls the callback)."""
        return [GaugeMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        try:
            for values, value in self._series():
                family.add_metric(values, value)
        except Exception:
            logger.exception("metrics callback for %s failed", self.name)
            family.samples.clear()
        return [family]

    def _series(self) -> Iterator[tuple[list[str], float]]:
        callback = self._callback
        if callback is None:
            if not self.labelnames:
                yield [], 0.0
            return
        result = callback()
        if not isinstance(result, Mapping):
            if self.labelnames:
                raise TypeError(f"{self.name}: a labelled gauge's callback must return a mapping")
            yield [], float(result)
            return
        for key, value in sorted(result.items(), key=lambda item: str(item[0])):
            values = [key] if isinstance(key, str) else list(key)
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values!r}")
            yield [str(v) for v in values], float(value)


class _WithoutCreated:
    """A registry's families less the ``*_created`` series (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            if family.type in ("counter", "histogram"):
                family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class OrchestratorMetrics:
    """The orchestrator's metrics, in a registry of their own.

    Gauges backed by live state take callbacks, bound with :meth:`bind` once
    the session directory exists. Known label values (turn outcomes, sandbox
    kinds, checkpoint failure reasons) are created up front, so they render as
    0 before the first event.
    """

    TURN_OUTCOMES: ClassVar[tuple[str, ...]] = (
        "ok", "error", "timeout", "cancelled", "crashed", "rejected",
    )  # fmt: skip
    SANDBOX_KINDS: ClassVar[tuple[str, ...]] = ("inprocess", "process")
    MAX_TEMPLATES: ClassVar[int] = 100
    """Templates with a series of their own in ``ppio_template_turn_duration_seconds``."""
    OTHER_TEMPLATE: ClassVar[str] = "_other"

    def __init__(
        self, registry: CollectorRegistry | None = None, *, snapshots: Path | None = None
    ) -> None:
        self.snapshots = snapshots
        """A worker's: where each rendered exposition is also written (module docstring)."""
        if snapshots is not None:
            snapshots.mkdir(parents=True, exist_ok=True)
        self.incarnation = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.registry = reg = registry if registry is not None else CollectorRegistry()
        self._exposition = _WithoutCreated(reg)
        self.sessions = CallbackGauge(
            "ppio_sessions", "Sessions by state.", ["state"], registry=reg
        )
        self.turns_total = Counter(
            "ppio_turns_total", "Turns by outcome.", ["outcome"], registry=reg
        )
        self.turn_duration_seconds = Histogram(
            "ppio_turn_duration_seconds", "Turn duration in seconds.", registry=reg
        )
        self.template_turn_duration_seconds = Histogram(
            "ppio_template_turn_duration_seconds",
            f"Turn duration in seconds, by template (at most {self.MAX_TEMPLATES}; "
            f'then "{self.OTHER_TEMPLATE}").',
            ["template"],
            registry=reg,
        )
        self.sandbox_starts_total = Counter(
            "ppio_sandbox_starts_total", "Sandboxes started, by kind.", ["kind"], registry=reg
        )
        self.sandbox_crashes_total = Counter(
            "ppio_sandbox_crashes_total", "Sandboxes that died, by kind.", ["kind"], registry=reg
        )
        self.mailbox_depth = CallbackGauge(
            "ppio_mailbox_depth", "Turns queued in all session mailboxes.", registry=reg
        )
        self.http_requests_total = Counter(
            "ppio_http_requests_total",
            "HTTP requests by route and status.",
            ["route", "status"],
            registry=reg,
        )
        self.checkpoints_total = Counter(
            "ppio_checkpoints_total", "Session checkpoints written.", registry=reg
        )
        self.checkpoint_bytes_total = Counter(
            "ppio_checkpoint_bytes_total", "Bytes of session checkpoints written.", registry=reg
        )
        self.checkpoint_failures_total = Counter(
            "ppio_checkpoint_failures_total",
            "Checkpoints not written: unserializable state, store errors, lost ownership.",
            ["reason"],
            registry=reg,
        )
        self.sessions_restored_total = Counter(
            "ppio_session_restores_total", "Sessions brought back from a checkpoint.", registry=reg
        )
        self.forwarded_total = Counter(
            "ppio_forwarded_total",
            "Requests forwarded to the node owning their session, by outcome.",
            ["outcome"],
            registry=reg,
        )
        for reason in ("unserializable", "store", "fenced"):
            self.checkpoint_failures_total.labels(reason)
        for outcome in self.TURN_OUTCOMES:
            self.turns_total.labels(outcome)
        for kind in self.SANDBOX_KINDS:
            self.sandbox_starts_total.labels(kind)
            self.sandbox_crashes_total.labels(kind)
        self._templates: dict[str, Histogram] = {}

    def bind(
        self,
        *,
        session_states: Callable[[], Mapping[str, float]] | None = None,
        mailbox_depth: Callable[[], float] | None = None,
    ) -> None:
        """Attach the scrape-time callbacks: sessions per state, total queued turns."""
        if session_states is not None:
            self.sessions.set_function(session_states)
        if mailbox_depth is not None:
            self.mailbox_depth.set_function(mailbox_depth)

    def record_turn(self, outcome: str, seconds: float | None = None) -> None:
        """Count a finished turn and, when given, observe its duration."""
        self.turns_total.labels(outcome).inc()
        if seconds is not None:
            self.turn_duration_seconds.observe(seconds)

    def record_template_turn(self, template: str, seconds: float) -> None:
        """Observe a finished turn's duration under its template's label."""
        child = self._templates.get(template)
        if child is None:
            label = template if len(self._templates) < self.MAX_TEMPLATES else self.OTHER_TEMPLATE
            child = self.template_turn_duration_seconds.labels(label)
            if label == template:
                self._templates[template] = child
        child.observe(seconds)

    def render(self) -> bytes:
        """The exposition text for ``GET /metrics`` (served with :data:`CONTENT_TYPE`);
        also written to this worker's snapshot file, when it has one."""
        text = generate_latest(self._exposition)
        if self.snapshots is not None:
            path = self.snapshots / f"{self.incarnation}.prom"
            partial = path.with_suffix(".partial")
            partial.write_bytes(text)
            partial.replace(path)  # a scrape reads the old file or the new, never half
        return text

    def carried(self, answered: Iterable[str]) -> list[bytes]:
        """The snapshots of the workers not in ``answered`` (incarnations) nor this one."""
        if self.snapshots is None:
            return []
        skip = {*answered, self.incarnation}
        texts = []
        for path in sorted(self.snapshots.glob("*.prom")):
            if path.stem not in skip:
                try:
                    texts.append(path.read_bytes())
                except OSError as exc:  # pragma: no cover - emptied under our feet
                    logger.warning("metrics: cannot read %s: %s", path, exc)
        return texts


class _Families:
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def merge_expositions(texts: Sequence[bytes], carried: Sequence[bytes] = ()) -> bytes:
    """One exposition of several processes' (the workers of a machine): samples summed.

    Each text is parsed with ``prometheus_client``'s parser; samples with the
    same name and labels add up, families keep the first text's order, help
    and type. ``carried`` (the snapshots of workers that did not answer) adds
    its counters and histograms, not its gauges. A text that cannot be parsed
    is left out (logged), not the scrape.
    """
    families: dict[str, Metric] = {}
    sums: dict[str, dict[tuple[str, frozenset[tuple[str, str]]], list[Any]]] = {}
    for text, live in [*((t, True) for t in texts), *((t, False) for t in carried)]:
        try:
            parsed = list(text_string_to_metric_families(text.decode("utf-8")))
        except (ValueError, UnicodeDecodeError) as exc:
            logger.warning("metrics: an exposition could not be parsed (%s); left out", exc)
            continue
        for family in parsed:
            if not live and family.type == "gauge":
                continue  # a gone worker's sessions are gone
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                sums[family.name] = {}
            series = sums[family.name]
            for sample in family.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                known = series.get(key)
                if known is None:
                    series[key] = [sample.name, sample.labels, sample.value]
                else:
                    known[2] += sample.value
    for name, family in families.items():
        for sample_name, labels, value in sums[name].values():
            family.add_sample(sample_name, labels, value)
    return generate_latest(_Families(families.values()))
