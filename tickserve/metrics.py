"""Prometheus pieces that take a micro-batch at once, and the labels kept bounded.

`BulkHistogram` is a histogram collector fed whole arrays: one `np.searchsorted` and
one `np.bincount` per micro-batch instead of a Python `observe` per tick (what
prometheus_client's `Histogram` offers). It exposes the same samples as that
`Histogram` fed the same values one by one (`tests/test_metrics.py` holds it to
that), through prometheus_client's public collector API.

`SymbolLabels` bounds the `symbol` label: an allow-list, or else the first
`max_symbols` symbols seen; every other symbol counts as `other`.

`StateGauge` is a gauge whose series are replaced or dropped as the state they show
changes (prometheus_client's `Gauge.remove` warns once Feast has switched the process
to multiprocess mode, see docs/metrics.md). `BuildInfo` keeps `tickserve_build_info`
at one series: the running code and the serving champion.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from prometheus_client import REGISTRY, CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

OTHER = "other"
DEFAULT_MAX_SYMBOLS = 20

PREDICTIONS = Counter(
    "predictions_total",
    "Ticks scored into a signal (stream) and rows scored for POST /predict",
    ["model", "symbol"],
)


class BulkHistogram(Collector):
    """A label-less histogram whose observations arrive as numpy arrays.

    Bucket semantics are Prometheus's: a value lands in the first bucket whose upper
    bound is >= the value (`le`), and in +Inf past the last one.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        """Register on `registry` (None: not registered, for tests)."""
        bounds = np.asarray(sorted(float(b) for b in buckets if b != float("inf")), np.float64)
        if bounds.size == 0:
            raise ValueError("a histogram needs at least one finite bucket")
        self.name = name
        self.documentation = documentation
        self.bounds = bounds
        self._labels = [str(floatToGoString(b)) for b in bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        self._counts = np.zeros(bounds.size + 1, np.int64)  # the last one is +Inf only
        self._sum = 0.0
        self._lock = threading.Lock()  # /metrics may be scraped from another thread
        if registry is not None:
            registry.register(self)

    def observe_many(self, values: np.ndarray) -> None:
        """Count every value of `values` (any shape, float seconds or units)."""
        flat = np.asarray(values, np.float64).ravel()
        if flat.size == 0:
            return
        where = np.searchsorted(self.bounds, flat, side="left")
        counts = np.bincount(where, minlength=self._counts.size)
        total = float(flat.sum())
        with self._lock:
            self._counts += counts
            self._sum += total

    def describe(self) -> Iterable[Metric]:
        """The family without samples (the registry reads its name from here)."""
        return [HistogramMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterator[Metric]:
        """The cumulative bucket counts, count and sum."""
        with self._lock:
            cumulative = np.cumsum(self._counts).tolist()
            total = self._sum
        yield HistogramMetricFamily(
            self.name,
            self.documentation,
            buckets=list(zip(self._labels, cumulative, strict=True)),
            sum_value=total,
        )


class StateGauge(Collector):
    """A labelled gauge that holds the current value of each series it shows."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        """Register on `registry` (None: not registered, for tests)."""
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    def set(self, labels: tuple[str, ...], value: float) -> None:
        """Show `value` for the series `labels` (one value per label name)."""
        with self._lock:
            self._values[labels] = value

    def remove(self, labels: tuple[str, ...]) -> None:
        """Stop showing the series `labels` (no error if it is not shown)."""
        with self._lock:
            self._values.pop(labels, None)

    def replace(self, labels: tuple[str, ...], value: float) -> None:
        """Show only the series `labels`."""
        with self._lock:
            self._values = {labels: value}

    def describe(self) -> Iterable[Metric]:
        """The family without samples (the registry reads its name from here)."""
        return [GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        """Every series shown now."""
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            for labels, value in self._values.items():
                family.add_metric(list(labels), value)
        yield family


BUILD_INFO = StateGauge(
    "tickserve_build_info",
    "Always 1: the running tickserve version, its git commit, and the serving champion",
    ["version", "commit", "model", "model_version"],
)


class SymbolLabels:
    """The `symbol` label of each feature slot, from a bounded set.

    With an allow-list, exactly those symbols keep their name; without one, the
    first `max_symbols` symbols seen do. Every other symbol is `other`. Slots are
    the feature engine's small integers; `of_slots` maps a batch of them at once.
    """

    def __init__(self, allow: Sequence[str] = (), max_symbols: int = DEFAULT_MAX_SYMBOLS) -> None:
        """Name `allow` (if given) or the first `max_symbols` symbols seen."""
        self.allow = frozenset(allow)
        self.max_symbols = max_symbols
        self.names: list[str] = [OTHER]  # label index -> label
        self._index: dict[str, int] = {OTHER: 0}
        self._of_slot = np.zeros(64, np.int64)  # slot -> label index (0: other)

    def label(self, symbol: str) -> str:
        """The label `symbol` counts under (it is given a name if there is room)."""
        return self.names[self._label_index(symbol)]

    def _label_index(self, symbol: str) -> int:
        index = self._index.get(symbol)
        if index is not None:
            return index
        named = len(self.names) - 1
        if (symbol in self.allow) if self.allow else named < self.max_symbols:
            self._index[symbol] = index = len(self.names)
            self.names.append(symbol)
            return index
        return 0

    def add(self, slot: int, symbol: str) -> None:
        """Feature slot `slot` holds `symbol` (call when the engine assigns it)."""
        if slot >= self._of_slot.size:
            grown = np.zeros(max(slot + 1, 2 * self._of_slot.size), np.int64)
            grown[: self._of_slot.size] = self._of_slot
            self._of_slot = grown
        self._of_slot[slot] = self._label_index(symbol)

    def counts(self, slots: np.ndarray) -> list[tuple[str, int]]:
        """(label, how many of `slots` count under it) for every label present."""
        if slots.size == 0:
            return []
        if int(slots.max()) >= self._of_slot.size:  # a slot never added: `other`
            self.add(int(slots.max()), OTHER)
        per_label = np.bincount(self._of_slot[slots], minlength=len(self.names))
        return [(self.names[i], int(per_label[i])) for i in np.flatnonzero(per_label).tolist()]


class BuildInfo:
    """`tickserve_build_info`: one series, relabelled when the champion changes."""

    def __init__(self, version: str, commit: str, gauge: StateGauge = BUILD_INFO) -> None:
        """The running code's version and commit; no champion yet."""
        self.version = version
        self.commit = commit
        self.gauge = gauge

    def serving(self, model: str, model_version: str) -> None:
        """`model` at `model_version` is the champion now (the previous series goes)."""
        self.gauge.replace((self.version, self.commit, model, model_version), 1.0)
