"""Microbenchmarks of the worker's metrics per micro-batch (`make bench`).

Groups: a micro-batch's prediction latencies into a histogram (prometheus_client's
`Histogram.observe` per tick vs `tickserve.metrics.BulkHistogram` once), and the whole
`BatchTelemetry.scored` call the worker makes per micro-batch.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram

from stream.kafka.testing import fetched_of
from stream.worker.telemetry import LATENCY_BUCKETS, BatchTelemetry
from tickserve.metrics import BulkHistogram, SymbolLabels

N = 1000


@pytest.fixture(scope="module")
def latencies() -> np.ndarray:
    return np.random.default_rng(1).exponential(0.003, N)


@pytest.mark.benchmark(group="latency histogram, 1000 ticks")
def test_histogram_per_tick(benchmark, latencies: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    hist = Histogram("b1_seconds", "doc", buckets=LATENCY_BUCKETS, registry=CollectorRegistry())
    values = latencies.tolist()

    def per_tick() -> None:
        for value in values:
            hist.observe(value)

    benchmark(per_tick)


@pytest.mark.benchmark(group="latency histogram, 1000 ticks")
def test_bulk_histogram(benchmark, latencies: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    bulk = BulkHistogram("b2_seconds", "doc", LATENCY_BUCKETS, registry=None)
    benchmark(bulk.observe_many, latencies)


@pytest.mark.benchmark(group="worker telemetry per micro-batch, 1000 ticks")
def test_batch_telemetry_scored(benchmark) -> None:  # type: ignore[no-untyped-def]
    symbols = SymbolLabels()
    for slot in range(8):
        symbols.add(slot, f"S{slot}/USDT")
    telemetry = BatchTelemetry(symbols)
    fetched = fetched_of("bench", [(0, i, b"k", b"v") for i in range(N)])
    slots = np.arange(N) % 8
    records = np.arange(N)
    now = time.time_ns()
    stamps = (now, now + 1000, now + 2000, now + 3000, now + 4000)
    benchmark(telemetry.scored, fetched, ("bench-model", "1"), slots, records, stamps, 0)
