"""The aiokafka data path (`stream.kafka.aiokafka_io`, public `getmany`) against `getmany` itself,
on the real broker; and the record-batch parser's edge cases."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
from aiokafka import TopicPartition
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from deploy.settings import Settings
from stream.kafka.aiokafka_io import GroupSource
from stream.kafka.base import DataPlaneConfig
from stream.kafka.clients import ensure_topics, make_consumer
from stream.kafka.fetched import Fetched, GapRetries
from stream.kafka.recordbatch import batch_bounds, parse_batches
from tests.helpers import PARTITIONS, run, unique
from tests.helpers import mixed_records as _records
from tests.helpers import produce_records as _produce
from tests.helpers import record_batch as _batch


class _Quiet:
    async def on_assigned(self, partitions: set[TopicPartition]) -> None:
        pass

    async def on_revoked(self, partitions: set[TopicPartition]) -> None:
        pass


async def _read(
    settings: Settings, topic: str, n: int, columns: bool
) -> tuple[dict[int, list[tuple]], dict[int, int]]:
    """(offset, key, value, timestamp) per partition, through `GroupSource.poll` or `getmany`.

    Also returns the newest high watermark `GroupSource.poll` gave per partition.
    """
    got: dict[int, list[tuple]] = {p: [] for p in range(PARTITIONS)}
    high: dict[int, int] = {}
    deadline = time.monotonic() + 60
    if columns:
        source = GroupSource(DataPlaneConfig(settings.bootstrap, topic, unique("g"), max_batch=100))
        await source.start(_Quiet())
        try:
            while sum(map(len, got.values())) < n and time.monotonic() < deadline:
                fetched = await source.poll(200)
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
                    assert await source.consumer.position(tp) == offset
                high.update({tp.partition: hw for tp, hw in fetched.high_watermarks.items()})
        finally:
            await source.close()
        return got, high
    consumer = make_consumer(settings.bootstrap, unique("g"), [topic], max_batch=100)
    await consumer.start()
    try:
        while sum(map(len, got.values())) < n and time.monotonic() < deadline:
            for tp, msgs in (await consumer.getmany(timeout_ms=200)).items():
                got[tp.partition].extend((m.offset, m.key, m.value, m.timestamp) for m in msgs)
    finally:
        await consumer.stop()
    return got, high


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_aiokafka_path_equals_getmany(stack_settings: Settings, compression: str | None) -> None:
    """Same records, offsets, timestamps and order per partition, positions and high watermarks."""
    topic = unique("fetch")
    records = _records(3000, seed=7)
    run(ensure_topics(stack_settings.bootstrap, [topic], PARTITIONS))
    run(_produce(stack_settings.bootstrap, topic, records, compression))
    ours, high = run(_read(stack_settings, topic, len(records), columns=True))
    ref, _ = run(_read(stack_settings, topic, len(records), columns=False))
    assert sum(map(len, ours.values())) == len(records)
    for p in range(PARTITIONS):
        assert ours[p] == ref[p]
        assert [o for o, _, _, _ in ours[p]] == list(range(len(ours[p])))
        mine = [(k, v) for k, v, q in records if q == p]
        assert [(k, v) for _, k, v, _ in ours[p]] == mine
        if ours[p]:
            assert high[p] == len(ours[p])


def test_a_gap_in_getmany_is_read_again_then_accepted() -> None:
    """Records up to a skipped offset are handed out and the consumer seeks back to it."""
    seeks: list[tuple[TopicPartition, int]] = []
    source = GroupSource.__new__(GroupSource)
    source.gaps = GapRetries(limit=2)
    source.consumer = SimpleNamespace(seek=lambda tp, offset: seeks.append((tp, offset)))  # type: ignore[assignment]
    source._expected = {}
    tp = TopicPartition("t", 0)
    source._expected[tp] = 10

    def records(*offsets: int) -> list[SimpleNamespace]:
        return [SimpleNamespace(offset=o) for o in offsets]

    taken, next_offset = source._up_to_gap(tp, records(10, 11, 14, 15))
    assert ([r.offset for r in taken], next_offset, seeks) == ([10, 11], 12, [(tp, 12)])
    taken, next_offset = source._up_to_gap(tp, records(14, 15))  # still missing: again
    assert ([r.offset for r in taken], next_offset) == ([], 12)
    taken, next_offset = source._up_to_gap(tp, records(14, 15))  # the third time: accepted
    assert ([r.offset for r in taken], next_offset) == ([14, 15], 16)
    assert len(seeks) == 2
    taken, next_offset = source._up_to_gap(tp, records(16, 17))
    assert ([r.offset for r in taken], next_offset) == ([16, 17], 18)


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


def test_an_empty_poll_times_out(stack_settings: Settings) -> None:
    topic = unique("fetch-empty")
    run(ensure_topics(stack_settings.bootstrap, [topic], 1))

    async def go() -> Fetched:
        source = GroupSource(DataPlaneConfig(stack_settings.bootstrap, topic, unique("g")))
        await source.start(_Quiet())
        try:
            await source.wait_assigned()
            return await source.poll(300)
        finally:
            await source.close()

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


def test_a_cut_takes_records_up_to_a_gap_then_accepts_it() -> None:
    """`GapRetries.cut`, as the aiokafka and librdkafka planes use it on consumed records."""
    gaps = GapRetries(limit=1)
    tp = TopicPartition("t", 0)
    assert gaps.cut(tp, [5, 6, 7], 5) == (3, 8, False)  # no gap: all, read on
    assert gaps.cut(tp, [8, 9, 12, 13], 8) == (2, 10, True)  # up to the gap, seek back to it
    assert gaps.cut(tp, [12, 13], 10) == (2, 14, False)  # seen again: accepted
    assert gaps.cut(tp, [20], 14) == (0, 14, True)  # a gap at the start takes nothing
