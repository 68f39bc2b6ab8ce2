"""Fetched records as columns: one fetch's record sets parsed into offsets and spans.

`Fetched` is what a data-plane client hands the worker: records of one topic as
offsets, timestamps and key/value spans of one byte buffer, no object per record.
`parse_records` turns one partition's fetched record set into such columns: plain
v2 batches in one Numba pass (`stream.kafka.recordbatch`), anything else
(compressed, legacy, control, malformed) through aiokafka's public record reader.
`GapRetries` holds back a fetch that skipped offsets, for a broker that answers
before earlier batches are readable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiokafka import TopicPartition
from aiokafka.errors import CorruptRecordException
from aiokafka.record.memory_records import MemoryRecords
from prometheus_client import Counter

from stream.kafka.recordbatch import batch_bounds, first_bad_crc, parse_batches

GAP_REFETCHES = Counter(
    "consumer_gap_refetches_total", "Fetches repeated because records before a batch were missing"
)


@dataclass(frozen=True, slots=True)
class Fetched:
    """Records of one drain, in partition order then offset order.

    Spans index `buf`; a length of -1 is a null key or value.
    """

    topic: str
    buf: np.ndarray  # uint8
    partition: np.ndarray  # int32 per record
    offset: np.ndarray  # int64 per record
    key_start: np.ndarray
    key_len: np.ndarray
    value_start: np.ndarray
    value_len: np.ndarray
    timestamp_ms: np.ndarray  # int64 per record: its Kafka timestamp (ms since the epoch)
    next_offsets: dict[TopicPartition, int]  # per partition: the offset after the last record
    via_aiokafka: int = 0  # partitions whose fetch took aiokafka's iterator (not plain v2)
    # per partition fetched: the broker's high watermark in that response (for lag)
    high_watermarks: dict[TopicPartition, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.offset)

    def key(self, i: int) -> bytes | None:
        """Key of record i (for dead letters and tests; not for the hot loop)."""
        n = int(self.key_len[i])
        return None if n < 0 else self.buf[self.key_start[i] : self.key_start[i] + n].tobytes()

    def value(self, i: int) -> bytes | None:
        """Value of record i (for dead letters and tests; not for the hot loop)."""
        n = int(self.value_len[i])
        start = self.value_start[i]
        return None if n < 0 else self.buf[start : start + n].tobytes()


def check_crcs(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, tp: TopicPartition) -> None:
    """Raise as aiokafka's `check_crcs` does if any batch's CRC-32C is wrong.

    In one Numba pass with the CPU's CRC-32C instruction where it has one, instead of
    aiokafka's table-driven call per batch.
    """
    if first_bad_crc(buf, starts, ends) >= 0:
        raise CorruptRecordException(f"Invalid CRC - {tp}")


class FetchedParts:
    """Per-partition pieces of a drain, concatenated into one `Fetched` at the end."""

    def __init__(self) -> None:
        self.raws: list[bytes] = []
        self.size = 0
        self.cols: list[tuple[np.ndarray, ...]] = []
        self.partitions: list[np.ndarray] = []
        self.next_offsets: dict[TopicPartition, int] = {}
        self.high_watermarks: dict[TopicPartition, int] = {}
        self.via_aiokafka = 0

    def add(self, tp: TopicPartition, raw: bytes, cols: tuple[np.ndarray, ...]) -> None:
        """Records of one partition whose spans (`cols`) index `raw`."""
        self.add_columns(raw, np.full(len(cols[0]), tp.partition, np.int32), cols)

    def add_columns(
        self, raw: bytes, partition: np.ndarray, cols: np.ndarray | tuple[np.ndarray, ...]
    ) -> None:
        """Records of several partitions whose spans (`cols`, `N_COLUMNS` rows) index `raw`."""
        offset, ks, kl, vs, vl, ts = cols
        if self.size:  # spans index `raw`: shift them past the pieces before it
            ks, vs = ks + self.size, vs + self.size
        self.cols.append((offset, ks, kl, vs, vl, ts))
        self.partitions.append(partition)
        self.raws.append(raw)
        self.size += len(raw)

    def add_records(self, tp: TopicPartition, records: Sequence[Any]) -> None:
        """Fallback: aiokafka's own ConsumerRecords (compressed, transactional, legacy)."""
        chunks: list[bytes] = []
        ks: list[int] = []
        kl: list[int] = []
        vs: list[int] = []
        vl: list[int] = []
        pos = 0
        for r in records:
            for data, starts, lens in ((r.key, ks, kl), (r.value, vs, vl)):
                starts.append(pos)
                lens.append(-1 if data is None else len(data))
                if data is not None:
                    chunks.append(data)
                    pos += len(data)
        self.via_aiokafka += 1
        offsets = np.array([r.offset for r in records], np.int64)
        cols = tuple(np.array(c, np.int64) for c in (ks, kl, vs, vl))
        timestamps = np.array([r.timestamp for r in records], np.int64)
        self.add(tp, b"".join(chunks), (offsets, *cols, timestamps))

    def build(self, topic: str) -> Fetched:
        """One `Fetched` of every piece added (no copy when there is one piece)."""
        if not self.cols:
            empty = np.empty(0, np.int64)
            return Fetched(
                topic,
                np.empty(0, np.uint8),
                np.empty(0, np.int32),
                empty,
                empty,
                empty,
                empty,
                empty,
                empty,
                {},
                self.via_aiokafka,
                self.high_watermarks,
            )
        if len(self.cols) == 1:  # the usual micro-batch (one fetch response): no copies
            buf = np.frombuffer(self.raws[0], np.uint8)
            partition, cols = self.partitions[0], tuple(self.cols[0])
        else:
            buf = np.frombuffer(b"".join(self.raws), np.uint8)
            partition = np.concatenate(self.partitions)
            cols = tuple(np.concatenate(c) for c in zip(*self.cols, strict=True))
        offset, key_start, key_len, value_start, value_len, timestamp_ms = cols
        return Fetched(
            topic,
            buf,
            partition,
            offset,
            key_start,
            key_len,
            value_start,
            value_len,
            timestamp_ms,
            self.next_offsets,
            self.via_aiokafka,
            self.high_watermarks,
        )


class GapRetries:
    """How often a fetch that skipped offsets is fetched again before the gap is accepted.

    Kafka skips offsets legitimately (compaction, transaction markers), but the local
    broker (Tansu 0.6) also answers a live fetch with batches whose predecessors are
    not readable yet: aiokafka's own `getmany` then skips them for good (measured:
    47 of 300,000 ticks at 20,000/s, present when read again later). So records up to
    the gap are taken and the position stays at the gap, to be fetched again; a gap
    still there after `limit` fetches is accepted (the worker logs it as an offset gap).
    """

    def __init__(self, limit: int = 20):
        """Allow `limit` fetches per gap."""
        self.limit = limit
        self._seen: dict[TopicPartition, tuple[int, int]] = {}  # tp -> (gap offset, fetches)

    def retry(self, tp: TopicPartition, gap_at: int) -> bool:
        """Whether to fetch again from `gap_at` (False: accept the gap)."""
        at, count = self._seen.get(tp, (gap_at, 0))
        count = count + 1 if at == gap_at else 1
        if count > self.limit:
            self._seen.pop(tp, None)
            return False
        self._seen[tp] = (gap_at, count)
        GAP_REFETCHES.inc()
        return True

    def passed(self, tp: TopicPartition) -> None:
        """A fetch for `tp` went through without a gap."""
        self._seen.pop(tp, None)

    def cut(
        self, tp: TopicPartition, offsets: Sequence[int], expected: int
    ) -> tuple[int, int, bool]:
        """Where to cut records of `tp` (their `offsets`) that should start at `expected`.

        Returns how many to take, the offset to go on from, and whether the consumer
        must seek back to it (a gap fetched again) rather than read on.
        """
        for i, offset in enumerate(offsets):
            if offset == expected + i:
                continue
            gap_at = expected + i
            if self.retry(tp, gap_at):
                return i, gap_at, True
            break
        else:
            self.passed(tp)
        return len(offsets), offsets[-1] + 1, False


def parse_plain(
    tp: TopicPartition,
    raw: bytes,
    buf: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    fetch_offset: int,
    gaps: GapRetries,
) -> tuple[tuple[np.ndarray, ...], int, int]:
    """Columns, next offset and status (0, or 2 malformed) of plain v2 batches."""
    check_crcs(buf, starts, ends, tp)
    *cols, next_offset, status = parse_batches(buf, starts, ends, fetch_offset, True)
    if status == 3 and not gaps.retry(tp, next_offset):
        *cols, next_offset, status = parse_batches(buf, starts, ends, fetch_offset, False)
    elif status == 3:
        status = 0  # take what precedes the gap; the position stays at the gap
    elif status == 0:
        gaps.passed(tp)
    return tuple(cols), next_offset, status


def parse_records(
    tp: TopicPartition, raw: bytes, fetch_offset: int, gaps: GapRetries
) -> tuple[bytes, tuple[np.ndarray, ...], int]:
    """One partition's fetched record set: (buffer, columns into it, next offset).

    Plain v2 batches are parsed in place; anything else (compressed, legacy,
    control, malformed) goes through aiokafka's own record reader, which
    decompresses, checks and raises as it does for `getmany`.
    """
    buf = np.frombuffer(raw, np.uint8)
    starts, ends, status = batch_bounds(buf)
    if status == 0:
        cols, next_offset, status = parse_plain(tp, raw, buf, starts, ends, fetch_offset, gaps)
        if status == 0:
            return raw, cols, next_offset
    parts = FetchedParts()
    records = MemoryRecords(raw)
    taken = []
    next_offset = fetch_offset
    while records.has_next():
        batch = records.next_batch()
        if batch is None:
            break
        if not batch.validate_crc():
            raise CorruptRecordException(f"Invalid CRC - {tp}")
        if not batch.is_control_batch:
            taken += [r for r in batch if r.offset >= fetch_offset]
        next_offset = max(next_offset, batch.next_offset)
    parts.add_records(tp, taken)
    built = parts.build(tp.topic)
    cols = (
        built.offset,
        built.key_start,
        built.key_len,
        built.value_start,
        built.value_len,
        built.timestamp_ms,
    )
    return built.buf.tobytes(), cols, next_offset
