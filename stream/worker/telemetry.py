"""The stream worker's metrics: what one micro-batch adds, in bulk, once per batch.

`BatchTelemetry.scored` is the one call per micro-batch on the hot path: ticks,
batch size, stage latencies, predictions per (model, symbol) and every scored tick's
`prediction_latency_seconds` (its record's Kafka timestamp to the moment its signal's
Produce was queued) go in with numpy counts, no Python per tick. `fetched` keeps
`consumer_lag` and `last_progress_timestamp_seconds`. Names, types and labels are
listed in docs/metrics.md (a test holds the two equal).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import numpy as np
from aiokafka import TopicPartition
from prometheus_client import Counter, Gauge, Histogram

from stream.kafka.fetched import Fetched
from tickserve.metrics import PREDICTIONS, BulkHistogram, StateGauge, SymbolLabels

# the seed's buckets (1 ms .. 1 s) plus finer and wider ones for the latency SLO
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
STAGE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)
STAGE_NAMES = ("decode", "features", "score", "produce")

TICKS = Counter("ticks_total", "Tick records consumed")
SIGNALS = Counter(
    "signals_total",
    "Ticks of the stream by outcome: ready=true scored by model/version, ready=false not ready",
    ["model", "version", "ready"],
)
LATENCY = BulkHistogram(
    "prediction_latency_seconds",
    "Per scored tick: its record's Kafka timestamp -> its signal's Produce queued",
    LATENCY_BUCKETS,
)
STAGE_LATENCY = Histogram(
    "stage_latency_seconds",
    "Per micro-batch, in-process time of each stage (decode, features, score, produce)",
    ["stage"],
    buckets=STAGE_BUCKETS,
)
BATCH_SIZE = Histogram(
    "micro_batch_size", "Records per micro-batch", buckets=(1, 10, 100, 500, 1000, 2000, 5000)
)
LAG = StateGauge(
    "consumer_lag",
    "Records behind the partition's high watermark after the last fetch",
    ["topic", "partition"],
)
PROGRESS = Gauge(
    "last_progress_timestamp_seconds", "Unix time the worker last handled a micro-batch"
)


class BatchTelemetry:
    """One worker's metric children, looked up once, and its bounded symbol labels."""

    def __init__(self, symbols: SymbolLabels | None = None) -> None:
        """Count predictions under `symbols` (default: the first 20 symbols seen)."""
        self.symbols = symbols if symbols is not None else SymbolLabels()
        self._stages = [STAGE_LATENCY.labels(stage) for stage in STAGE_NAMES]
        self._signals: dict[tuple[str, str], tuple[Counter, Counter]] = {}
        self._predictions: dict[tuple[str, str], Counter] = {}  # (model, symbol label)
        self._lagging: set[TopicPartition] = set()  # partitions whose lag this worker shows

    def scored(
        self,
        fetched: Fetched,
        model: tuple[str, str],
        slots: np.ndarray,
        records: np.ndarray,
        stamps_ns: tuple[int, int, int, int, int],
        not_ready: int,
    ) -> None:
        """A micro-batch whose signals were queued for produce.

        Args:
            fetched: The micro-batch.
            model: (name, version) of the model that scored it.
            slots: Feature slot of each scored tick (its signal has a score).
            records: Record index (into `fetched`) of each scored tick.
            stamps_ns: Wall-clock ns at: received, decoded, featured, scored, produced.
            not_ready: Ticks whose features were not ready yet (no signal).
        """
        TICKS.inc(len(fetched))
        BATCH_SIZE.observe(len(fetched))
        for child, start, end in zip(self._stages, stamps_ns, stamps_ns[1:], strict=False):
            child.observe((end - start) / 1e9)
        name, version = model
        served, unready = self._signal_children(name, version)
        served.inc(records.size)
        if not_ready:
            unready.inc(not_ready)
        if records.size:
            predictions = self._predictions
            for label, n in self.symbols.counts(slots):
                counter = predictions.get((name, label))
                if counter is None:
                    counter = predictions[name, label] = PREDICTIONS.labels(name, label)
                counter.inc(n)
            produced_ms = stamps_ns[4] / 1e6
            LATENCY.observe_many((produced_ms - fetched.timestamp_ms[records]) / 1e3)

    def fetched(
        self, fetched: Fetched, positions: Mapping[TopicPartition, int] | None = None
    ) -> dict[TopicPartition, int]:
        """Consumer lag per partition from the high watermarks of this fetch, returned too.

        A partition without records this time is at `positions` (the worker's next
        offset), or caught up to its high watermark where no position is known.
        """
        known = positions or {}
        moved = fetched.next_offsets
        lag = {}
        for tp, high in fetched.high_watermarks.items():
            lag[tp] = max(high - moved.get(tp, known.get(tp, high)), 0)
        self.lagged(lag)
        return lag

    def lagged(self, lag: Mapping[TopicPartition, int]) -> None:
        """Set `consumer_lag` of these partitions."""
        for tp, n in lag.items():
            LAG.set((tp.topic, str(tp.partition)), n)
            self._lagging.add(tp)

    def progressed(self) -> None:
        """A micro-batch was handled (its acks and commit follow in the background)."""
        PROGRESS.set(time.time())

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop the lag of partitions this worker no longer owns."""
        for tp in list(partitions):
            LAG.remove((tp.topic, str(tp.partition)))
            self._lagging.discard(tp)

    def close(self) -> None:
        """The worker stopped: drop the lag of every partition it showed."""
        self.forget(self._lagging)

    def _signal_children(self, name: str, version: str) -> tuple[Counter, Counter]:
        key = (name, version)
        children = self._signals.get(key)
        if children is None:
            children = (SIGNALS.labels(name, version, "true"), SIGNALS.labels(name, "", "false"))
            self._signals[key] = children
        return children
