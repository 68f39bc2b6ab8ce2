"""Fetched records as columns: Kafka record batches parsed in bulk, no object per record.

aiokafka turns every fetched record into a `ConsumerRecord` (about 0.8 us each here),
before the worker has looked at it. `drain` takes the raw record batches that
aiokafka's fetcher has buffered, checks their CRCs, and parses them with one Numba
pass into offsets and key/value spans of one byte buffer. The worker decodes the
values from that buffer in bulk (`stream.tickcodec`).

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
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.consumer import fetcher as aiokafka_fetcher
from aiokafka.consumer.fetcher import FetchResult
from aiokafka.errors import ConsumerStoppedError, CorruptRecordException
from numba import njit
from prometheus_client import Counter

HEADER_BYTES = 61  # a v2 record batch's fixed header
GAP_REFETCHES = Counter(
    "consumer_gap_refetches_total", "Fetches repeated because records before a batch were missing"
)
_ATTR_UNSUPPORTED = 0x07 | 0x10 | 0x20  # compression codec, transactional, control


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
    next_offsets: dict[TopicPartition, int]  # per partition: the offset after the last record
    via_aiokafka: int = 0  # partitions whose fetch took aiokafka's iterator (not plain v2)

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


class _RawMemoryRecords:
    """aiokafka's MemoryRecords, plus the bytes it was made from (`raw`)."""

    __slots__ = ("_inner", "raw")

    def __init__(self, raw: bytes) -> None:
        self._inner = _MEMORY_RECORDS(raw)
        self.raw = raw

    def size_in_bytes(self) -> int:
        return int(self._inner.size_in_bytes())

    def has_next(self) -> bool:
        return bool(self._inner.has_next())

    def next_batch(self) -> Any:
        return self._inner.next_batch()


_MEMORY_RECORDS = aiokafka_fetcher.MemoryRecords


def install() -> None:
    """Make aiokafka's fetcher keep each fetch's raw bytes (idempotent; before `drain`)."""
    aiokafka_fetcher.MemoryRecords = _RawMemoryRecords  # type: ignore[misc]


@njit(cache=True, inline="always")
def read_varint(buf: np.ndarray, pos: int) -> tuple[int, int]:
    """A zigzag varint at `pos`: (value, next position); position -1 past the end."""
    shift = 0
    raw = 0
    while pos < buf.shape[0]:
        b = np.int64(buf[pos])
        pos += 1
        raw |= (b & 0x7F) << shift
        if b < 0x80:
            return (raw >> 1) ^ -(raw & 1), pos
        shift += 7
        if shift > 63:
            return 0, -1
    return 0, -1


@njit(cache=True, inline="always")
def _be(buf: np.ndarray, pos: int, size: int) -> int:
    value = np.int64(0)
    for k in range(size):
        value = (value << 8) | np.int64(buf[pos + k])
    return value


@njit(cache=True)
def batch_bounds(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Start and end of each complete batch, and a status: 0 plain v2, 1 otherwise.

    A fetch may end in a partial batch (the broker cuts at the byte limit): it is
    left out, as aiokafka does, and fetched again from its offset.
    """
    n = buf.shape[0]
    starts = []
    ends = []
    pos = 0
    status = 0
    while pos + 17 <= n:
        length = _be(buf, pos + 8, 4)
        end = pos + 12 + length
        if end > n:
            break
        legacy = buf[pos + 16] != 2 or length < HEADER_BYTES - 12
        if legacy or _be(buf, pos + 21, 2) & _ATTR_UNSUPPORTED:
            status = 1
        starts.append(pos)
        ends.append(end)
        pos = end
    return np.array(starts, np.int64), np.array(ends, np.int64), status


@njit(cache=True)
def parse_batches(
    buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, fetch_offset: int, stop_at_gap: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Offsets and key/value spans of the records at or after `fetch_offset`.

    Returns (offset, key_start, key_len, value_start, value_len, next_offset, status);
    status 0 is success, 2 a malformed record, 3 a gap: with `stop_at_gap`, parsing
    stops before a batch that starts after the offset the previous one ended at, and
    `next_offset` is that missing offset.
    """
    total = 0
    for b in range(starts.shape[0]):
        total += _be(buf, starts[b] + 57, 4)
    cols = np.empty((5, total), np.int64)  # offset, key start, key length, value start, length
    k, next_offset, status = parse_into(buf, starts, ends, fetch_offset, stop_at_gap, cols, 0)
    return cols[0, :k], cols[1, :k], cols[2, :k], cols[3, :k], cols[4, :k], next_offset, status


@njit(cache=True)
def parse_into(
    buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, fetch_offset: int, stop_at_gap: bool,
    cols: np.ndarray, k: int,
) -> tuple[int, int, int]:  # fmt: skip
    """`parse_batches` writing into `cols` (5 rows) from column `k`: (new k, next offset, status).

    A malformed record returns next offset 0 and status 2.
    """
    next_offset = fetch_offset
    for b in range(starts.shape[0]):
        start, end = starts[b], ends[b]
        base = _be(buf, start, 8)
        if stop_at_gap and base > next_offset:
            return k, next_offset, 3
        count = _be(buf, start + 57, 4)
        pos = start + HEADER_BYTES
        for _ in range(count):
            length, pos = read_varint(buf, pos)
            if pos < 0 or pos + length > end:
                return k, 0, 2
            record_end = pos + length
            pos += 1  # attributes
            _, pos = read_varint(buf, pos)  # timestamp delta
            delta, pos = read_varint(buf, pos)
            klen, pos = read_varint(buf, pos)
            kpos = pos
            if klen > 0:
                pos += klen
            vlen, pos = read_varint(buf, pos)
            vpos = pos
            if pos < 0 or pos > record_end or vpos + max(vlen, 0) > record_end:
                return k, 0, 2
            pos = record_end  # headers are not read: ticks carry none that we use
            if base + delta < fetch_offset:
                continue  # before the position (a batch fetched from its middle)
            cols[0, k] = base + delta
            cols[1, k] = kpos
            cols[2, k] = klen
            cols[3, k] = vpos
            cols[4, k] = vlen
            k += 1
        # v2 keeps the last offset even when compaction removed records
        next_offset = max(next_offset, base + _be(buf, start + 23, 4) + 1)
    return k, next_offset, 0


def _check_crcs(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, tp: TopicPartition) -> None:
    """Raise as aiokafka's `check_crcs` does if any batch's CRC-32C is wrong.

    In one Numba pass with the CPU's CRC-32C instruction where it has one: aiokafka's
    per-batch call (table-driven) was ~2% of the worker's time at 20,000 ticks/s.
    """
    from stream.records import first_bad_crc  # stream.records imports this module

    if first_bad_crc(buf, starts, ends) >= 0:
        raise CorruptRecordException(f"Invalid CRC - {tp}")


class _Parts:
    """Per-partition pieces of a drain, concatenated into one `Fetched` at the end."""

    def __init__(self) -> None:
        self.raws: list[bytes] = []
        self.size = 0
        self.cols: list[tuple[np.ndarray, ...]] = []
        self.partitions: list[np.ndarray] = []
        self.next_offsets: dict[TopicPartition, int] = {}
        self.via_aiokafka = 0

    def add(self, tp: TopicPartition, raw: bytes, cols: tuple[np.ndarray, ...]) -> None:
        """Records of one partition whose spans (`cols`) index `raw`."""
        self.add_columns(raw, np.full(len(cols[0]), tp.partition, np.int32), cols)

    def add_columns(
        self, raw: bytes, partition: np.ndarray, cols: np.ndarray | tuple[np.ndarray, ...]
    ) -> None:
        """Records of several partitions whose spans (`cols`, 5 rows) index `raw`."""
        offset, ks, kl, vs, vl = cols
        if self.size:  # spans index `raw`: shift them past the pieces before it
            ks, vs = ks + self.size, vs + self.size
        self.cols.append((offset, ks, kl, vs, vl))
        self.partitions.append(partition)
        self.raws.append(raw)
        self.size += len(raw)

    def add_records(self, tp: TopicPartition, records: list[Any]) -> None:
        """Fallback: aiokafka's own ConsumerRecords (compressed, transactional, legacy)."""
        chunks: list[bytes] = []
        ks, kl, vs, vl = [], [], [], []
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
        self.add(tp, b"".join(chunks), (offsets, *cols))

    def build(self, topic: str) -> Fetched:
        if not self.cols:
            empty = np.empty(0, np.int64)
            return Fetched(topic, np.empty(0, np.uint8), np.empty(0, np.int32), empty, empty,
                           empty, empty, empty, {}, self.via_aiokafka)  # fmt: skip
        if len(self.cols) == 1:  # the usual micro-batch (one fetch response): no copies
            buf = np.frombuffer(self.raws[0], np.uint8)
            return Fetched(topic, buf, self.partitions[0], *self.cols[0], self.next_offsets,
                           self.via_aiokafka)  # fmt: skip
        cols = [np.concatenate(c) for c in zip(*self.cols, strict=True)]
        buf = np.frombuffer(b"".join(self.raws), np.uint8)
        return Fetched(topic, buf, np.concatenate(self.partitions), *cols, self.next_offsets,
                       self.via_aiokafka)  # fmt: skip


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
        self.refetches = 0

    def retry(self, tp: TopicPartition, gap_at: int) -> bool:
        """Whether to fetch again from `gap_at` (False: accept the gap)."""
        at, count = self._seen.get(tp, (gap_at, 0))
        count = count + 1 if at == gap_at else 1
        if count > self.limit:
            self._seen.pop(tp, None)
            return False
        self._seen[tp] = (gap_at, count)
        self.refetches += 1
        GAP_REFETCHES.inc()
        return True

    def passed(self, tp: TopicPartition) -> None:
        """A fetch for `tp` went through without a gap."""
        self._seen.pop(tp, None)


def _plain(
    tp: TopicPartition, raw: bytes, buf: np.ndarray, starts: np.ndarray, ends: np.ndarray,
    fetch_offset: int, gaps: GapRetries,
) -> tuple[tuple[np.ndarray, ...], int, int]:  # fmt: skip
    """Columns, next offset and status (0, or 2 malformed) of plain v2 batches."""
    _check_crcs(buf, starts, ends, tp)
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
        cols, next_offset, status = _plain(tp, raw, buf, starts, ends, fetch_offset, gaps)
        if status == 0:
            return raw, cols, next_offset
    parts = _Parts()
    records = _MEMORY_RECORDS(raw)
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
    cols = (built.offset, built.key_start, built.key_len, built.value_start, built.value_len)
    return built.buf.tobytes(), cols, next_offset


def _take(tp: TopicPartition, result: FetchResult, parts: _Parts, gaps: GapRetries) -> None:
    """Move one partition's buffered fetch into `parts` and advance its position."""
    records = result._partition_records
    raw = getattr(records._records, "raw", None)  # None: fetched before `install`
    status = 1
    if raw is not None:
        buf = np.frombuffer(raw, np.uint8)
        starts, ends, status = batch_bounds(buf)
    if status == 0:
        fetch_offset = records.next_fetch_offset
        cols, next_offset, status = _plain(tp, raw, buf, starts, ends, fetch_offset, gaps)
    if status != 0:
        parts.add_records(tp, result.getall())  # aiokafka updates the position itself
    else:
        if len(cols[0]):
            parts.add(tp, raw, tuple(cols))
        records.next_fetch_offset = next_offset
        result._update_position()
        result._partition_records = None
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
            parts = _Parts()
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
    _check_crcs(buf, starts, ends, TopicPartition("warm-up", 0))
    parse_batches(buf, starts, ends, 0, True)
