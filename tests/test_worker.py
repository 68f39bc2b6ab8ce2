"""The worker wires its parts: a micro-batch through fakes of the data plane and stores."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import numpy as np
import orjson
from aiokafka import TopicPartition
from aiokafka.record.default_records import DefaultRecordBatch

from features.engine import FeatureEngine
from features.spec import FeatureSpec
from features.testing import MemorySnapshots, RecordingWriter
from inference.batcher import BatcherConfig, MicroBatcher
from inference.testing import loaded, make_onnx_classifier
from stream.contracts.signal import Signal
from stream.contracts.tick import Tick
from stream.kafka.base import DataPlane, DataPlaneConfig
from stream.kafka.testing import FakeSink, FakeSource, fetched_of
from stream.worker import StreamWorker, WorkerConfig
from stream.worker.worker import PREDICTION_ERRORS


def test_a_micro_batch_gives_signals_dead_letters_a_commit_and_a_snapshot() -> None:
    spec = FeatureSpec(bar_ns=100_000)  # every tick closes a bar: ready after the warm-up
    model = loaded(make_onnx_classifier(spec.n_features, "logistic", seed=1), spec.n_features)
    batcher = MicroBatcher(model, spec.n_features, BatcherConfig(max_batch=100))
    source, sink = FakeSource(), FakeSink()
    snapshots, writer = MemorySnapshots(), RecordingWriter()
    seen: list[DataPlaneConfig] = []

    def open_dataplane(config: DataPlaneConfig) -> DataPlane:
        seen.append(config)
        return DataPlane(source, sink)

    plane = DataPlaneConfig("nowhere:1", "ticks", "g")
    config = WorkerConfig(plane, "signals", "dlq", commit_interval_s=0.0)
    worker = StreamWorker(config, FeatureEngine(spec), batcher, open_dataplane, writer, snapshots)
    start = time.time_ns() - 10**9
    ticks = [
        Tick("A", start + i * 100_000, 1.0 + i / 100, 1.0, "buy", f"t{i}", start).encode()
        for i in range(60)
    ]
    records = [(0, i, b"A", v) for i, v in enumerate([*ticks, b"not json"])]
    source.push(fetched_of("ticks", records))

    async def main() -> None:
        stop = asyncio.Event()
        run = asyncio.create_task(worker.run(stop))
        deadline = time.monotonic() + 20
        while not source.commits and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        stop.set()
        await run

    asyncio.run(main())
    assert seen == [config.dataplane]
    assert worker.processed == 61
    signals = [b for b in sink.batches if b[0] == "signals"]
    assert sum(count for *_, count in signals) == 60  # one per tick, none for the bad record
    [dead] = sink.records
    assert (dead.topic, dead.value, dead.headers["reason"]) == ("dlq", b"not json", b"decode")
    assert source.committed_offsets == {TopicPartition("ticks", 0): 61}
    assert source.closed and sink.closed and writer.closed and snapshots.closed
    assert set(snapshots.saved) == {("ticks", 0)}  # on shutdown, after the last commit
    assert snapshots.saved[("ticks", 0)].next_offset == 61
    latest = worker.latest("A")
    assert latest is not None and latest[0] == start + 59 * 100_000
    assert writer.offers and writer.offers[-1][0] == ["A"]


def test_symbols_past_max_symbols_become_dead_letters_and_the_worker_goes_on() -> None:
    spec = FeatureSpec(bar_ns=100_000)
    model = loaded(make_onnx_classifier(spec.n_features, "logistic", seed=1), spec.n_features)
    batcher = MicroBatcher(model, spec.n_features, BatcherConfig(max_batch=100))
    source, sink = FakeSource(), FakeSink()
    config = WorkerConfig(DataPlaneConfig("nowhere:1", "ticks", "g"), "signals", "dlq")
    engine = FeatureEngine(spec, max_symbols=2, initial_symbols=1)
    worker = StreamWorker(config, engine, batcher, lambda _: DataPlane(source, sink))
    start = time.time_ns() - 10**9
    symbols = ["A", "B", "C", "A", "D", "B", "C"]  # C and D find no room
    ticks = [
        Tick(s, start + i * 100_000, 1.0, 1.0, "buy", f"t{i}", start).encode()
        for i, s in enumerate(symbols)
    ]
    source.push(
        fetched_of(
            "ticks",
            [(0, i, s.encode(), v) for i, (s, v) in enumerate(zip(symbols, ticks, strict=True))],
        )
    )
    # a second batch: the symbols already held still get their signals
    later = Tick("A", start + 10**6, 1.0, 1.0, "sell", "t9", start).encode()
    source.push(
        fetched_of("ticks", [(0, 7, b"A", later), (0, 8, b"E", later.replace(b'"A"', b'"E"'))])
    )

    async def main() -> None:
        stop = asyncio.Event()
        run = asyncio.create_task(worker.run(stop))
        deadline = time.monotonic() + 20
        while worker.processed < 9 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        stop.set()
        await run

    asyncio.run(main())
    assert worker.processed == 9
    assert engine.symbols == ["A", "B"]
    signals = [b for b in sink.batches if b[0] == "signals"]
    assert sum(count for *_, count in signals) == 5  # A, B, A, B, A
    dead = [(r.value, r.headers["reason"]) for r in sink.records]
    assert [reason for _, reason in dead] == [b"capacity"] * 4
    assert [orjson.loads(value)["symbol"] for value, _ in dead] == ["C", "D", "C", "E"]
    assert b"max_symbols=2" in sink.records[0].headers["detail"]


class _NanForSomeRows:
    """A scorer that fails (NaN) on every third row it is given, as a model can in production."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.provider, self.engine = inner, inner.provider, inner.engine

    def score(self, batch: np.ndarray) -> np.ndarray:
        scores = np.asarray(self.inner.score(batch), np.float64).copy()
        scores[::3] = np.nan
        return scores


def test_non_finite_scores_are_errors_not_not_ready() -> None:
    spec = FeatureSpec(bar_ns=100_000)
    good = loaded(make_onnx_classifier(spec.n_features, "logistic", seed=1), spec.n_features)
    model = dataclasses.replace(good, scorer=_NanForSomeRows(good.scorer), version="5")
    batcher = MicroBatcher(model, spec.n_features, BatcherConfig(max_batch=100))
    source, sink = FakeSource(), FakeSink()
    config = WorkerConfig(DataPlaneConfig("nowhere:1", "ticks", "g"), "signals", "dlq")
    worker = StreamWorker(config, FeatureEngine(spec), batcher, lambda _: DataPlane(source, sink))
    start = time.time_ns() - 10**9
    ticks = [
        Tick("A", start + i * 100_000, 1.0 + i / 100, 1.0, "buy", f"t{i}", start).encode()
        for i in range(60)
    ]
    source.push(fetched_of("ticks", [(2, 100 + i, b"A", v) for i, v in enumerate(ticks)]))
    errors = PREDICTION_ERRORS.labels("m", "5", "non_finite")
    before = errors._value.get()

    async def main() -> None:
        stop = asyncio.Event()
        run = asyncio.create_task(worker.run(stop))
        deadline = time.monotonic() + 20
        while worker.processed < 60 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        stop.set()
        await run

    asyncio.run(main())
    signals = [
        Signal.decode(r.value)
        for _, data, _ in (b[1:] for b in sink.batches if b[0] == "signals")
        for r in DefaultRecordBatch(data)
    ]
    assert [(s.partition, s.offset) for s in signals] == [(2, 100 + i) for i in range(60)]
    ready = [s for s in signals if s.ready]
    failed = [s for s in ready if s.error is not None]
    assert ready and len(failed) == len(ready[::3])
    assert all((s.score, s.direction, s.version, s.error) == (None, 0, "5", "non_finite")
               for s in failed)  # fmt: skip
    assert all(s.score is not None and s.error is None for s in ready if s not in failed)
    assert not any(s.error for s in signals if not s.ready)
    assert errors._value.get() == before + len(failed)
    assert batcher.health.scored == len(ready) and batcher.health.non_finite == len(failed)
