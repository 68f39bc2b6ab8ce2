"""`stream.kafka.aiokafka_adapter.drain` against aiokafka's own `getmany`, on the real broker."""

from __future__ import annotations

import time

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from deploy.settings import Settings
from stream.kafka.aiokafka_adapter import drain, install
from stream.kafka.clients import ensure_topics, make_consumer
from stream.kafka.fetched import Fetched, GapRetries
from stream.kafka.recordbatch import batch_bounds, parse_batches
from tests.helpers import PARTITIONS, run, unique
from tests.helpers import mixed_records as _records
from tests.helpers import produce_records as _produce
from tests.helpers import record_batch as _batch


async def _read(
    settings: Settings, topic: str, n: int, raw: bool
) -> tuple[dict[int, list[tuple]], int]:
    """(offset, key, value) per partition, through `drain` or through `getmany`.

    Also returns how many partition fetches `drain` handed to aiokafka's iterator.
    """
    install()
    consumer = make_consumer(settings.bootstrap, unique("g"), [topic], max_batch=100)
    await consumer.start()
    got: dict[int, list[tuple]] = {p: [] for p in range(PARTITIONS)}
    via_aiokafka = 0
    try:
        deadline = time.monotonic() + 60
        while sum(map(len, got.values())) < n and time.monotonic() < deadline:
            if raw:
                fetched = await drain(consumer, topic, 200)
                via_aiokafka += fetched.via_aiokafka
                for i in range(len(fetched)):
                    got[int(fetched.partition[i])].append(
                        (
                            int(fetched.offset[i]),
                            fetched.key(i),
                            fetched.value(i),
                            int(fetched.timestamp_ms[i]),
                        )
                    )
                for tp, offset in fetched.next_offsets.items():
                    assert await consumer.position(tp) == offset
            else:
                for tp, msgs in (await consumer.getmany(timeout_ms=200)).items():
                    got[tp.partition].extend((m.offset, m.key, m.value, m.timestamp) for m in msgs)
    finally:
        await consumer.stop()
    return got, via_aiokafka


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_drain_equals_getmany(stack_settings: Settings, compression: str | None) -> None:
    """Same records, offsets, timestamps and order per partition; gzip takes aiokafka's path."""
    topic = unique("fetch")
    records = _records(3000, seed=7)
    run(ensure_topics(stack_settings.bootstrap, [topic], PARTITIONS))
    run(_produce(stack_settings.bootstrap, topic, records, compression))
    raw, via_aiokafka = run(_read(stack_settings, topic, len(records), raw=True))
    ref, _ = run(_read(stack_settings, topic, len(records), raw=False))
    # plain batches are parsed by us; gzip ones by aiokafka (and still equal)
    assert (via_aiokafka > 0) == (compression is not None)
    assert sum(map(len, raw.values())) == len(records)
    for p in range(PARTITIONS):
        assert raw[p] == ref[p]
        assert [o for o, _, _, _ in raw[p]] == list(range(len(raw[p])))
        mine = [(k, v) for k, v, q in records if q == p]
        assert [(k, v) for _, k, v, _ in raw[p]] == mine


def test_parse_skips_records_before_the_fetch_offset_and_partial_batches() -> None:
    """A fetch may start mid-batch and end in a cut batch: both handled as aiokafka does."""
    whole = _batch(5, 10) + _batch(4, 15)
    cut = whole + _batch(3, 19)[:40]
    buf = np.frombuffer(cut, np.uint8)
    starts, ends, status = batch_bounds(buf)
    assert status == 0 and len(starts) == 2
    offset, _, _, vs, vl, _, next_offset, status = parse_batches(buf, starts, ends, 12, True)
    assert status == 0
    assert offset.tolist() == [12, 13, 14, 15, 16, 17, 18]
    assert next_offset == 19
    assert [cut[s : s + n] for s, n in zip(vs, vl, strict=True)][0] == b"v12"


def test_compressed_batches_are_flagged_for_aiokafka() -> None:
    builder = DefaultRecordBatchBuilder(2, 1, 0, -1, -1, -1, 1 << 20)  # gzip
    builder.append(0, timestamp=1, key=None, value=b"x" * 100, headers=[])
    _, _, status = batch_bounds(np.frombuffer(bytes(builder.build()), np.uint8))
    assert status == 1


def test_corrupt_batch_raises(stack_settings: Settings) -> None:
    """A CRC mismatch raises like aiokafka's check_crcs, never yields records."""
    from aiokafka.errors import CorruptRecordException

    from stream.kafka.fetched import check_crcs

    raw = bytearray(_batch(3, 0))
    raw[-1] ^= 0xFF
    buf = np.frombuffer(bytes(raw), np.uint8)
    starts, ends, _ = batch_bounds(buf)
    with pytest.raises(CorruptRecordException):
        check_crcs(buf, starts, ends, TopicPartition("t", 0))


def test_crc_check_finds_the_corrupt_batch_with_either_kernel() -> None:
    from stream.kafka import recordbatch as records

    raw = bytearray(_batch(3, 0) + _batch(4, 3) + _batch(2, 7))
    buf = np.frombuffer(bytes(raw), np.uint8)
    starts, ends, _ = batch_bounds(buf)
    kernels = [records._first_bad_crc_tables]
    if records.HARDWARE_CRC:
        kernels.append(records._first_bad_crc_sse42)
    for kernel in kernels:
        assert kernel(buf, starts, ends) == -1
        for b in range(3):
            bad = bytearray(raw)
            bad[int(ends[b]) - 1] ^= 0x01  # the last byte of batch b
            assert kernel(np.frombuffer(bytes(bad), np.uint8), starts, ends) == b


def test_empty_drain_times_out(stack_settings: Settings) -> None:
    topic = unique("fetch-empty")
    run(ensure_topics(stack_settings.bootstrap, [topic], 1))

    async def go() -> Fetched:
        consumer: AIOKafkaConsumer = make_consumer(stack_settings.bootstrap, unique("g"), [topic])
        await consumer.start()
        try:
            return await drain(consumer, topic, 300)
        finally:
            await consumer.stop()

    fetched = run(go())
    assert len(fetched) == 0 and fetched.next_offsets == {}


def test_a_gap_stops_the_parse_at_the_missing_offset() -> None:
    """Batches 10-14 and 20-23: with stop_at_gap the records after 14 wait for 15-19."""
    buf = np.frombuffer(_batch(5, 10) + _batch(4, 20), np.uint8)
    starts, ends, _ = batch_bounds(buf)
    offset, _, _, _, _, _, next_offset, status = parse_batches(buf, starts, ends, 10, True)
    assert (offset.tolist(), next_offset, status) == ([10, 11, 12, 13, 14], 15, 3)
    offset, _, _, _, _, _, next_offset, status = parse_batches(buf, starts, ends, 10, False)
    assert (offset.tolist(), next_offset, status) == ([10, 11, 12, 13, 14, 20, 21, 22, 23], 24, 0)
    # a fetch that starts after its own offset is a gap too
    offset, _, _, _, _, _, next_offset, status = parse_batches(buf, starts[1:], ends[1:], 15, True)
    assert (offset.tolist(), next_offset, status) == ([], 15, 3)


def test_gap_retries_are_bounded_per_gap() -> None:
    gaps = GapRetries(limit=2)
    tp, other = TopicPartition("t", 0), TopicPartition("t", 1)
    assert gaps.retry(tp, 15) and gaps.retry(tp, 15)
    assert gaps.retry(other, 3)  # counted per partition
    assert not gaps.retry(tp, 15)  # the third fetch at the same gap accepts it
    assert gaps.retry(tp, 15)  # a later gap at the same offset starts over
    gaps.passed(tp)
    assert gaps.retry(tp, 40) and gaps.retry(tp, 40) and not gaps.retry(tp, 40)
    assert not GapRetries(limit=0).retry(tp, 1)
