"""The one module that reaches into aiokafka's private internals: columnar fetch, prebuilt produce.

aiokafka turns every fetched record into a `ConsumerRecord` (a Python object per
record) before the worker has looked at it. `drain` takes the raw record batches that
aiokafka's fetcher has buffered, checks their CRCs, and parses them with one Numba
pass into offsets and key/value spans of one byte buffer. The worker decodes the
values from that buffer in bulk (`stream.contracts.tickcodec`).

Only plain message-format v2 batches take this path (uncompressed, not transactional,
not control). A fetch holding anything else is handed to aiokafka's own iterator, so
nothing is lost or reordered; it only costs what it cost before.

aiokafka's compiled `MemoryRecords` does not expose its bytes, so `install` swaps
the name its fetcher module uses for a wrapper that keeps them (one Python call per
fetched partition, not per record; every other consumer in the process behaves as
before). `drain` then follows aiokafka 0.14's own `fetched_records` step by step over
its private `_records` / `FetchResult` / `PartitionRecords`. `tests/test_fetch.py`
compares `drain` with `getmany` on the real broker, so an aiokafka upgrade that
moves these fails there first.

`PrebuiltBatch` / `send_batches` hand finished record batches
(`stream.kafka.signalbatch`) to `AIOKafkaProducer.send_batch` in place of its
`BatchBuilder`; `tests/test_records.py` pins the members aiokafka uses.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.consumer import fetcher as aiokafka_fetcher
from aiokafka.consumer.fetcher import FetchResult
from aiokafka.errors import ConsumerStoppedError
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import calc_crc32c

from stream.kafka.fetched import (
    Fetched,
    FetchedParts,
    GapRetries,
    check_crcs,
    parse_plain,
)
from stream.kafka.recordbatch import (
    ATTRIBUTES_OFFSET,
    CRC_OFFSET,
    PRODUCER_OFFSET,
    PRODUCER_STATE,
    batch_bounds,
    parse_batches,
)


class _RawMemoryRecords:
    """aiokafka's MemoryRecords, plus the bytes it was made from (`raw`)."""

    __slots__ = ("_inner", "raw")

    def __init__(self, raw: bytes) -> None:
        self._inner = MemoryRecords(raw)
        self.raw = raw

    def size_in_bytes(self) -> int:
        return int(self._inner.size_in_bytes())

    def has_next(self) -> bool:
        return bool(self._inner.has_next())

    def next_batch(self) -> Any:
        return self._inner.next_batch()


def install() -> None:
    """Make aiokafka's fetcher keep each fetch's raw bytes (idempotent; before `drain`)."""
    aiokafka_fetcher.MemoryRecords = _RawMemoryRecords


def _take(tp: TopicPartition, result: FetchResult, parts: FetchedParts, gaps: GapRetries) -> None:
    """Move one partition's buffered fetch into `parts` and advance its position."""
    records = result._partition_records
    raw: bytes | None = getattr(records._records, "raw", None)  # None: fetched before `install`
    status = 1
    if raw is not None:
        buf = np.frombuffer(raw, np.uint8)
        starts, ends, status = batch_bounds(buf)
        if status == 0:
            fetch_offset = records.next_fetch_offset
            cols, next_offset, status = parse_plain(tp, raw, buf, starts, ends, fetch_offset, gaps)
        if status == 0:
            if len(cols[0]):
                parts.add(tp, raw, tuple(cols))
            records.next_fetch_offset = next_offset
            result._update_position()
            result._partition_records = None
    if status != 0:
        parts.add_records(tp, result.getall())  # aiokafka updates the position itself
    parts.next_offsets[tp] = records.next_fetch_offset


async def drain(
    consumer: AIOKafkaConsumer, topic: str, timeout_ms: int, gaps: GapRetries | None = None
) -> Fetched:
    """Everything fetched so far (waiting up to `timeout_ms` for some), as columns.

    The counterpart of `consumer.getmany()` for one subscribed topic: the same
    checks (stopped, coordinator errors, rebalance in progress) and the same
    position updates, without building a ConsumerRecord per record. Call `install`
    before the consumer starts. Pass the same `gaps` to every call on one consumer
    (None: gaps are accepted at once, as aiokafka does).
    """
    gaps = gaps if gaps is not None else GapRetries(limit=0)
    if consumer._closed:
        raise ConsumerStoppedError()
    consumer._coordinator.check_errors()
    fetcher = consumer._fetcher
    subscription = consumer._subscription
    deadline = time.monotonic() + timeout_ms / 1000
    with subscription.fetch_context():
        while True:
            if subscription.reassignment_in_progress:
                await subscription.wait_for_assignment()
            parts = FetchedParts()
            for tp in list(fetcher._records):
                result = fetcher._records[tp]
                if type(result) is not FetchResult:
                    if parts.cols:
                        break  # return what we have; the error is raised next time
                    del fetcher._records[tp]
                    fetcher._notify(fetcher._wait_consume_future)
                    result.check_raise()
                if result.check_assignment(tp) and result.has_more():
                    _take(tp, result, parts, gaps)
                    high_watermark = consumer.highwater(tp)
                    if high_watermark is not None:
                        parts.high_watermarks[tp] = high_watermark
                del fetcher._records[tp]
                fetcher._notify(fetcher._wait_consume_future)
            if parts.cols:
                return parts.build(topic)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return parts.build(topic)
            waiter = fetcher._create_fetch_waiter()
            done, pending = await asyncio.wait([waiter], timeout=remaining)
            if not done or fetcher._closed:
                for fut in pending:
                    fut.cancel()
                return parts.build(topic)
            waiter.result()


def warm_up() -> None:
    """Load (or compile) the parser now, before the worker joins its group."""
    from aiokafka.record.default_records import DefaultRecordBatchBuilder

    builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1 << 16)
    builder.append(0, timestamp=1, key=b"k", value=b"v", headers=[])
    buf = np.frombuffer(bytes(builder.build()), np.uint8)
    starts, ends, _ = batch_bounds(buf)
    check_crcs(buf, starts, ends, TopicPartition("warm-up", 0))
    parse_batches(buf, starts, ends, 0, True)


class PrebuiltBatch:
    """A finished record batch that `AIOKafkaProducer.send_batch` takes in place of its builder.

    aiokafka 0.14's accumulator and sender use a `BatchBuilder` through these
    members only (producer/message_accumulator.py: `MessageBatch`,
    `MessageAccumulator.add_message/flush_for_commit`): `append` (returns None when
    full, so `producer.send()` to the same partition opens a new batch), `close`,
    `closed`, `record_count`, `size`, `_build` (the bytes of the ProduceRequest,
    again on a retry) and `_set_producer_state` (idempotent producers).
    tests/test_records.py pins that list against aiokafka's source.

    The batch is closed from the start, so the sender takes it at once instead of
    letting it linger `linger_ms` for appends that will never come. It carries no
    transactional flag: use it with non-transactional producers only.
    """

    __slots__ = ("_buffer", "_count")

    def __init__(self, data: bytes, record_count: int):
        """Wrap one complete batch, as `encode_signal_batches` returns it."""
        self._buffer = data
        self._count = record_count

    def append(self, *, timestamp: int | None, key: Any, value: Any, headers: Any = ()) -> None:
        """Refuse the record: the batch is full (aiokafka then opens a new one)."""
        return None

    def close(self) -> None:
        """Nothing to do: the batch was closed when it was built."""

    def closed(self) -> bool:
        """Always closed."""
        return True

    def record_count(self) -> int:
        """Records in the batch."""
        return self._count

    def size(self) -> int:
        """Bytes of the batch."""
        return len(self._buffer)

    def _build(self) -> bytes:
        return self._buffer

    def _set_producer_state(
        self, producer_id: int, producer_epoch: int, base_sequence: int
    ) -> None:
        buf = bytearray(self._buffer)
        PRODUCER_STATE.pack_into(buf, PRODUCER_OFFSET, producer_id, producer_epoch, base_sequence)
        struct.pack_into(">I", buf, CRC_OFFSET, calc_crc32c(buf[ATTRIBUTES_OFFSET:]))
        self._buffer = bytes(buf)


async def send_batches(
    producer: AIOKafkaProducer, topic: str, batches: Sequence[tuple[int, bytes, int]]
) -> list[asyncio.Future[Any]]:
    """Queue the batches of `encode_signal_batches`; the futures resolve on the broker's acks.

    Batches of one partition are queued in order (aiokafka keeps one in flight per
    partition, so they land in order).
    """
    return [
        await producer.send_batch(PrebuiltBatch(data, count), topic, partition=p)
        for p, data, count in batches
    ]
