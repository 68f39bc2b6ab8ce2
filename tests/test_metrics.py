"""Bulk metrics against prometheus_client's own, bounded labels, and the metrics table."""

from __future__ import annotations

import importlib
import pkgutil

import numpy as np
import pytest
from aiokafka import TopicPartition
from prometheus_client import REGISTRY, CollectorRegistry, Histogram

from stream.kafka.testing import fetched_of
from stream.worker.telemetry import LATENCY_BUCKETS, BatchTelemetry
from tests.helpers import metrics_table, table_mismatches
from tickserve.metrics import OTHER, BuildInfo, BulkHistogram, StateGauge, SymbolLabels

PRODUCT = ("tickserve", "stream", "features", "inference", "training", "deploy")


def _samples(collector: object) -> dict[tuple[str, str], float]:
    """(sample name, le) -> value of a histogram's bucket, count and sum samples."""
    out = {}
    for family in collector.collect():  # type: ignore[attr-defined]
        for s in family.samples:
            if not s.name.endswith("_created"):
                out[(s.name, s.labels.get("le", ""))] = s.value
    return out


def test_bulk_histogram_equals_prometheus_histogram_fed_one_by_one() -> None:
    """Same buckets (bounds hit exactly, negatives, past the last bound) and same sum."""
    rng = np.random.default_rng(3)
    batches = [
        rng.exponential(0.02, 1000),
        np.array(LATENCY_BUCKETS),  # on a bound: `le` counts it in that bucket
        np.array([-0.001, 0.0, 3.0, 1e9]),
        np.array([]),
        rng.uniform(0, 3, 7),
    ]
    bulk = BulkHistogram("lat_seconds", "doc", LATENCY_BUCKETS, registry=None)
    reference = Histogram(
        "lat_seconds", "doc", buckets=LATENCY_BUCKETS, registry=CollectorRegistry()
    )
    for batch in batches:
        bulk.observe_many(batch)
        for value in batch.tolist():
            reference.observe(value)
    ours, theirs = _samples(bulk), _samples(reference)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, rel=1e-12), key
    assert ours[("lat_seconds_count", "")] == sum(len(b) for b in batches)


def test_symbol_labels_are_bounded() -> None:
    first = SymbolLabels(max_symbols=2)
    for slot, symbol in enumerate(["A", "B", "C", "D"]):
        first.add(slot, symbol)
    assert [first.label(s) for s in ("A", "B", "C", "E")] == ["A", "B", OTHER, OTHER]
    assert first.counts(np.array([0, 0, 1, 2, 3, 2])) == [(OTHER, 3), ("A", 2), ("B", 1)]
    allowed = SymbolLabels(allow=["C"])
    allowed.add(0, "A")
    allowed.add(1, "C")
    assert allowed.counts(np.array([0, 1, 1])) == [(OTHER, 1), ("C", 2)]
    assert allowed.counts(np.array([5])) == [(OTHER, 1)]  # a slot never added
    assert allowed.counts(np.array([], np.int64)) == []


def test_build_info_keeps_one_child_across_swaps() -> None:
    gauge = StateGauge("b_info", "doc", ["version", "commit", "model", "model_version"],
                       registry=None)  # fmt: skip
    build = BuildInfo("0.1.0", "abc", gauge)
    build.serving("m", "1")
    build.serving("m", "2")
    samples = [s for f in gauge.collect() for s in f.samples]
    assert [(s.labels["model_version"], s.value) for s in samples] == [("2", 1.0)]


def test_batch_telemetry_counts_lag_per_partition() -> None:
    telemetry = BatchTelemetry()
    topic = "lag-test"
    fetched = fetched_of(topic, [(0, 5, b"k", b"v"), (1, 9, b"k", b"v")])
    fetched.high_watermarks.update({TopicPartition(topic, 0): 16, TopicPartition(topic, 2): 4})
    telemetry.fetched(fetched)

    def lag(partition: str) -> float | None:
        return REGISTRY.get_sample_value("consumer_lag", {"topic": topic, "partition": partition})

    assert (lag("0"), lag("1"), lag("2")) == (10.0, None, 0.0)  # 16 - position 6; caught up
    telemetry.forget([TopicPartition(topic, 0)])
    assert (lag("0"), lag("2")) == (None, 0.0)
    telemetry.close()  # the worker stopped
    assert lag("2") is None


def test_the_metrics_table_lists_exactly_the_registry() -> None:
    """docs/metrics.md against every metric the product's modules define."""
    for package in PRODUCT:
        module = importlib.import_module(package)
        for info in pkgutil.walk_packages(module.__path__, f"{package}."):
            importlib.import_module(info.name)
    assert metrics_table(), "docs/metrics.md has no table rows"
    assert table_mismatches(REGISTRY.collect()) == []
