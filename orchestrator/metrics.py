"""A small Prometheus registry rendering the text exposition format 0.0.4.

Three metric kinds, each optionally labelled:

- :class:`Counter` -- only goes up (``inc``);
- :class:`Gauge` -- ``set``/``inc``/``dec``, or a callback evaluated at scrape
  time (``set_function``);
- :class:`Histogram` -- fixed buckets (default: latency, 1 ms .. 60 s).

The hot path is one dict lookup and one add: resolve a labelled child once
with ``labels(...)`` (or keep it) and call ``inc``/``observe`` on it. Nothing
is locked: the orchestrator updates metrics from one event loop thread.

>>> registry = Registry()
>>> turns = registry.register(Counter("turns_total", "Turns by outcome.", ["outcome"]))
>>> ok = turns.labels("ok")
>>> ok.inc()
>>> print(registry.render().decode(), end="")
# HELP turns_total Turns by outcome.
# TYPE turns_total counter
turns_total{outcome="ok"} 1.0
"""

from __future__ import annotations

import bisect
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_LATENCY_BUCKETS",
    "Counter",
    "CounterChild",
    "Gauge",
    "GaugeChild",
    "Histogram",
    "HistogramChild",
    "OrchestratorMetrics",
    "Registry",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

logger = logging.getLogger(__name__)

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

LabelValue = str | int
GaugeCallback = Callable[[], float | Mapping[Any, float]]
"""A scrape-time gauge value: a number, or ``{label value or tuple of them: number}``."""


def _format_value(value: float) -> str:
    if isinstance(value, int):  # bucket and observation counts
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _label_block(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    pairs = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


class CounterChild:
    """One labelled series of a counter."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (not negative)."""
        if amount < 0:
            raise ValueError("a counter only goes up")
        self.value += amount


class GaugeChild:
    """One labelled series of a gauge."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def set(self, value: float) -> None:
        """Set the value."""
        self.value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount``."""
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        """Subtract ``amount``."""
        self.value -= amount


class HistogramChild:
    """One labelled series of a histogram: per-bucket counts, sum and count."""

    __slots__ = ("_bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Record one observation (``le`` is inclusive: 1.0 falls in ``le="1.0"``)."""
        self.counts[bisect.bisect_left(self._bounds, value)] += 1
        self.sum += value
        self.count += 1


C = TypeVar("C", CounterChild, GaugeChild, HistogramChild)
M = TypeVar("M", "Counter", "Gauge", "Histogram")


class _Metric(Generic[C]):
    """Name, help, label names and the children by label values."""

    kind: ClassVar[str]

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        if not _METRIC_NAME.fullmatch(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in labelnames:
            if not _LABEL_NAME.fullmatch(label) or label.startswith("__"):
                raise ValueError(f"invalid label name {label!r}")
        if len(set(labelnames)) != len(labelnames):
            raise ValueError(f"repeated label name in {list(labelnames)}")
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], C] = {}
        # Also keyed by the values as given (e.g. an int status), so a hit skips str().
        self._lookup: dict[tuple[LabelValue, ...], C] = {}
        self._default: C | None = None
        if not labelnames:
            self._default = self._children[()] = self._lookup[()] = self._new_child()

    def _new_child(self) -> C:
        raise NotImplementedError

    def labels(self, *values: LabelValue) -> C:
        """The child for these label values (in ``labelnames`` order); keep it for speed."""
        child = self._lookup.get(values)
        if child is None:
            child = self._resolve(values)
        return child

    def _resolve(self, values: tuple[LabelValue, ...]) -> C:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values!r}")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._new_child()
        self._lookup[values] = child
        return child

    def _unlabelled(self) -> C:
        if self._default is None:
            raise ValueError(f"{self.name} has labels {self.labelnames}: use .labels(...)")
        return self._default

    def _series(self) -> Iterator[tuple[tuple[str, ...], C]]:
        return iter(sorted(self._children.items(), key=lambda item: item[0]))

    def _samples(self) -> Iterator[str]:
        raise NotImplementedError

    def render(self) -> str:
        """This metric's HELP, TYPE and sample lines."""
        head = f"# HELP {self.name} {_escape_help(self.documentation)}\n"
        head += f"# TYPE {self.name} {self.kind}\n"
        return head + "".join(f"{line}\n" for line in self._samples())


class Counter(_Metric[CounterChild]):
    """A monotonically increasing count. Name it ``..._total``."""

    kind = "counter"

    def _new_child(self) -> CounterChild:
        return CounterChild()

    def inc(self, amount: float = 1.0) -> None:
        """Increment the unlabelled counter."""
        self._unlabelled().inc(amount)

    def _samples(self) -> Iterator[str]:
        for values, child in self._series():
            yield f"{self.name}{_label_block(self.labelnames, values)} {_format_value(child.value)}"


class Gauge(_Metric[GaugeChild]):
    """A value that goes up and down, set directly or computed by a callback at scrape time."""

    kind = "gauge"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        callback: GaugeCallback | None = None,
    ) -> None:
        super().__init__(name, documentation, labelnames)
        self._callback = callback

    def _new_child(self) -> GaugeChild:
        return GaugeChild()

    def set_function(self, callback: GaugeCallback | None) -> None:
        """Compute the value(s) at scrape time; for a labelled gauge the callback
        returns ``{label_value: v}`` (one label) or ``{(v1, v2): v}``."""
        self._callback = callback

    def set(self, value: float) -> None:
        """Set the unlabelled gauge."""
        self._unlabelled().set(value)

    def inc(self, amount: float = 1.0) -> None:
        """Add to the unlabelled gauge."""
        self._unlabelled().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        """Subtract from the unlabelled gauge."""
        self._unlabelled().dec(amount)

    def _callback_series(self, callback: GaugeCallback) -> list[tuple[tuple[str, ...], float]]:
        result = callback()
        if not isinstance(result, Mapping):
            if self.labelnames:
                raise TypeError(f"{self.name}: a labelled gauge's callback must return a mapping")
            return [((), float(result))]
        series = []
        for key, value in result.items():
            values = (key,) if isinstance(key, str) else tuple(key)
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values!r}")
            series.append((tuple(str(v) for v in values), float(value)))
        return sorted(series)

    def _samples(self) -> Iterator[str]:
        if self._callback is None:
            series = [(values, child.value) for values, child in self._series()]
        else:
            try:
                series = self._callback_series(self._callback)
            except Exception:
                # One broken callback must not take the whole scrape down.
                logger.exception("metrics callback for %s failed", self.name)
                series = []
        for values, value in series:
            yield f"{self.name}{_label_block(self.labelnames, values)} {_format_value(value)}"


class Histogram(_Metric[HistogramChild]):
    """Observations counted in fixed cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float] = DEFAULT_LATENCY_BUCKETS,
    ) -> None:
        bounds = tuple(sorted(float(b) for b in buckets if not math.isinf(b)))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError("histogram buckets must be distinct and not only +Inf")
        if "le" in labelnames:
            raise ValueError("'le' is reserved for histogram buckets")
        self.buckets = bounds
        super().__init__(name, documentation, labelnames)

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self.buckets)

    def observe(self, value: float) -> None:
        """Observe into the unlabelled histogram."""
        self._unlabelled().observe(value)

    def _samples(self) -> Iterator[str]:
        names = self.labelnames
        bounds = [*(_format_value(b) for b in self.buckets), "+Inf"]
        for values, child in self._series():
            cumulative = 0
            for bound, count in zip(bounds, child.counts, strict=True):
                cumulative += count
                labels = _label_block(names, values, f'le="{bound}"')
                yield f"{self.name}_bucket{labels} {_format_value(cumulative)}"
            labels = _label_block(names, values)
            yield f"{self.name}_sum{labels} {_format_value(child.sum)}"
            yield f"{self.name}_count{labels} {_format_value(child.count)}"


class Registry:
    """A set of metrics with unique names, rendered together."""

    def __init__(self) -> None:
        self._metrics: dict[str, Counter | Gauge | Histogram] = {}

    def register(self, metric: M) -> M:
        """Add a metric and return it; a repeated name is a ``ValueError``."""
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name!r} is already registered")
        self._metrics[metric.name] = metric
        return metric

    def render(self) -> bytes:
        """Every metric in registration order, as served with :data:`CONTENT_TYPE`."""
        return "".join(metric.render() for metric in self._metrics.values()).encode("utf-8")


class OrchestratorMetrics:
    """The orchestrator's metrics, in their own :class:`Registry`.

    Gauges backed by live state take callbacks, bound with :meth:`bind` once
    the session directory exists. Known label values (turn outcomes, sandbox
    kinds) are created up front so they render as 0 before the first event.
    """

    TURN_OUTCOMES: ClassVar[tuple[str, ...]] = (
        "ok", "error", "timeout", "cancelled", "crashed", "rejected",
    )  # fmt: skip
    SANDBOX_KINDS: ClassVar[tuple[str, ...]] = ("inprocess", "process")

    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = reg = registry or Registry()
        self.sessions = reg.register(Gauge("ppio_sessions", "Sessions by state.", ["state"]))
        self.turns_total = reg.register(
            Counter("ppio_turns_total", "Turns by outcome.", ["outcome"])
        )
        self.turn_duration_seconds = reg.register(
            Histogram("ppio_turn_duration_seconds", "Turn duration in seconds.")
        )
        self.sandbox_starts_total = reg.register(
            Counter("ppio_sandbox_starts_total", "Sandboxes started, by kind.", ["kind"])
        )
        self.sandbox_crashes_total = reg.register(
            Counter("ppio_sandbox_crashes_total", "Sandboxes that died, by kind.", ["kind"])
        )
        self.mailbox_depth = reg.register(
            Gauge("ppio_mailbox_depth", "Turns queued in all session mailboxes.")
        )
        self.http_requests_total = reg.register(
            Counter(
                "ppio_http_requests_total",
                "HTTP requests by route and status.",
                ["route", "status"],
            )
        )
        self.checkpoints_total = reg.register(
            Counter("ppio_checkpoints_total", "Session checkpoints written.")
        )
        self.checkpoint_bytes_total = reg.register(
            Counter("ppio_checkpoint_bytes_total", "Bytes of session checkpoints written.")
        )
        self.checkpoint_failures_total = reg.register(
            Counter(
                "ppio_checkpoint_failures_total",
                "Checkpoints not written: unserializable state, store errors, lost ownership.",
                ["reason"],
            )
        )
        self.sessions_restored_total = reg.register(
            Counter("ppio_session_restores_total", "Sessions brought back from a checkpoint.")
        )
        self.forwarded_total = reg.register(
            Counter(
                "ppio_forwarded_total",
                "Requests forwarded to the node owning their session, by outcome.",
                ["outcome"],
            )
        )
        for reason in ("unserializable", "store", "fenced"):
            self.checkpoint_failures_total.labels(reason)
        for outcome in self.TURN_OUTCOMES:
            self.turns_total.labels(outcome)
        for kind in self.SANDBOX_KINDS:
            self.sandbox_starts_total.labels(kind)
            self.sandbox_crashes_total.labels(kind)

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

    def render(self) -> bytes:
        """The exposition text for ``GET /metrics``."""
        return self.registry.render()


def merge_expositions(texts: Sequence[bytes]) -> bytes:
    """One exposition of several processes' (the workers of a machine): samples summed.

    Every family here adds up across processes -- counters, histogram buckets,
    sums and counts, and the gauges (sessions, queued turns) -- so the
    machine's figure is the sum of its workers'. HELP and TYPE lines are kept
    once, in the first text's order.
    """
    order: list[str] = []
    meta: dict[str, list[str]] = {}
    samples: dict[str, dict[str, float]] = {}
    for text in texts:
        family = ""
        for line in text.decode().splitlines():
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    if family not in meta:
                        meta[family] = []
                        order.append(family)
                        samples[family] = {}
                    if all(not known.startswith(f"# {parts[1]} ") for known in meta[family]):
                        meta[family].append(line)
                continue
            series, _, value = line.rpartition(" ")
            bucket = samples.setdefault(family, {})
            if family not in meta:
                meta[family] = []
                order.append(family)
            bucket[series] = bucket.get(series, 0.0) + float(value)
    out: list[str] = []
    for family in order:
        out.extend(meta[family])
        out.extend(f"{series} {_format_value(value)}" for series, value in samples[family].items())
    return ("\n".join(out) + "\n").encode()
