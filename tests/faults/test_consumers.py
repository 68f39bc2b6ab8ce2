"""A slow reader of the signals topic: the worker neither slows down nor loses a tick."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time

import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from tests.faults import oracle
from tests.faults.harness import InProcess, Publisher, market
from tests.helpers import Pipeline, fresh, run, unique

pytestmark = [pytest.mark.services, pytest.mark.timeout(600)]

RATE = 1000  # ticks per second
STREAM_S = 10.0
STALL_S = 5.0  # the reader stops polling for this long, mid-stream


class _SlowReader:
    """A plain aiokafka consumer in a group of its own: 10 records per poll, 0.2 s apart,
    and one stall of `STALL_S` without polling at all."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.read = 0
        self.error: BaseException | None = None
        self.stalled = threading.Event()  # set once the stall has begun
        self.done = threading.Event()
        self.thread = threading.Thread(target=lambda: self._body(bootstrap, topic), daemon=True)
        self.thread.start()

    def _body(self, bootstrap: str, topic: str) -> None:
        try:
            asyncio.run(self._read(bootstrap, topic))
        except BaseException as exc:
            self.error = exc

    async def _read(self, bootstrap: str, topic: str) -> None:
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=unique("slow-reader"),
            auto_offset_reset="earliest",
            max_poll_records=10,
            fetch_max_bytes=64 * 1024,
            max_partition_fetch_bytes=16 * 1024,
        )
        await consumer.start()
        try:
            polls = 0
            while not self.done.is_set():
                got = await consumer.getmany(timeout_ms=100, max_records=10)
                self.read += sum(len(v) for v in got.values())
                polls += 1
                if polls == 20:  # a few seconds in: stop reading for a while
                    self.stalled.set()
                    await asyncio.sleep(STALL_S)
                else:
                    await asyncio.sleep(0.2)
        finally:
            await consumer.stop()

    def stop(self) -> None:
        self.done.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "slow reader did not stop"
        assert self.error is None, repr(self.error)


def test_slow_signals_consumer(pipeline: Pipeline) -> None:
    """A reader that lags far behind and stalls costs the worker nothing: every tick
    answered once, promptly, while the reader is still behind."""
    settings = fresh(pipeline.settings, max_batch=500)
    ticks = market(pipeline, int(RATE * STREAM_S))
    worker = InProcess(settings)
    reader: _SlowReader | None = None
    try:
        worker.wait_assigned()
        reader = _SlowReader(settings.bootstrap, settings.signals_topic)
        publisher = Publisher(settings, ticks, rate=RATE)
        sent = publisher.join(STREAM_S + 60)
        published = time.time()
        result = oracle.answered(settings, expect_ticks=sent, fault_end=published)
        assert reader.stalled.is_set(), "the reader never stalled: the fault did not happen"
        behind = reader.read  # what the reader had got through when every tick was answered
        logged = run(oracle.read_log(settings.bootstrap, settings.ticks_topic))
        signals = run(oracle.read_log(settings.bootstrap, settings.signals_topic))
        alive = worker.alive
    finally:
        if reader is not None:
            reader.stop()
        stopped = worker.stop()
    at = {(t.partition, t.offset): t.ts_ms for t in logged}  # type: ignore[attr-defined]
    lags = []
    for s in signals:  # type: ignore[attr-defined]
        doc = orjson.loads(s.value or b"")
        lags.append(s.ts_ms - at[(int(doc["partition"]), int(doc["offset"]))])
    lags.sort()
    p50 = statistics.median(lags) / 1000 if lags else float("nan")
    p99 = lags[int(0.99 * (len(lags) - 1))] / 1000 if lags else float("nan")
    oracle.record(
        "Slow signals consumer",
        result,
        f"{sent:,} ticks at {RATE:,}/s; a reader of 10 signals per 0.2 s that stalls "
        f"{STALL_S:.0f} s had read {behind:,} when all were answered; tick-to-signal "
        f"p50 {p50:.3f} s, p99 {p99:.3f} s (broker timestamps)",
    )
    print(f"account: {result}; reader behind at {behind}; p50 {p50:.3f} s p99 {p99:.3f} s")
    assert alive and stopped
    result.check()
    assert result.signalled == sent, result
    assert behind < sent / 2, f"the reader kept up ({behind:,} of {sent:,}): no backpressure tried"
    # the worker kept pace with the stream while its reader lagged: no backlog at the end
    assert result.recover_s is not None and result.recover_s < 5.0, result
    assert p99 < 2.0, (p50, p99)
