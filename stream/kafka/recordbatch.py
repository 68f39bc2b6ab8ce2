"""Kafka's record batch (message format v2): the one owner of its layout.

Reading: `batch_bounds` finds the complete batches of a fetched record set,
`parse_batches` / `parse_into` cut them into offsets, key/value spans and record
timestamps in one Numba pass, `first_bad_crc` checks their CRC-32C. Writing:
`plan_batches` splits rows into batches as aiokafka's `BatchBuilder` would,
`put_batch_header`, `put_varint` and `copy_bytes` write them, `crc_batches` fills
in the CRCs. Everything here works on numpy byte buffers and is called from other
Numba kernels (`stream.kafka.signalbatch`, `stream.kafka.wire`,
`stream.kafka.aiokafka_adapter`).

`tests/test_records.py` holds the bytes equal to aiokafka's own builder and reader.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import config as numba_config
from numba import njit, types
from numba.extending import intrinsic

# The record batch header, field for field as aiokafka's DefaultRecordBatchBuilder packs
# it: baseOffset, batchLength, partitionLeaderEpoch, magic, crc, attributes,
# lastOffsetDelta, baseTimestamp, maxTimestamp, producerId, producerEpoch,
# baseSequence, record count.
BATCH_HEADER = struct.Struct(">qiibIhiqqqhii")
HEADER_SIZE = BATCH_HEADER.size  # 61
LENGTH_OFFSET = 12  # batchLength counts the bytes after itself
CRC_OFFSET = 17  # the CRC-32C covers attributes .. end of the batch
ATTRIBUTES_OFFSET = 21
PRODUCER_OFFSET = 43  # producerId, producerEpoch, baseSequence (idempotent producers)
PRODUCER_STATE = struct.Struct(">qhi")
# aiokafka's BatchBuilder for a plain (non-idempotent) producer: producer_id -1,
# epoch -1, base_sequence 0 (the Java client writes -1 there; brokers ignore it
# without a producer id).
NO_PRODUCER = (-1, -1, 0)
DEFAULT_MAX_BATCH_BYTES = 256 * 1024  # stream.kafka.clients.make_producer's max_batch_size
# Byte copies go by 32-byte vector moves (one instruction with AVX): a numba byte loop
# checks each signed index for wraparound and took most of the kernel's time. Varints
# go as one 8-byte store. Both assume a little-endian CPU.
COPY_BLOCK = 32
PADDING = bytes(COPY_BLOCK)
ATTR_UNSUPPORTED = 0x07 | 0x10 | 0x20  # compression codec, transactional, control
ATTR_LOG_APPEND_TIME = 0x08  # every record's timestamp is the batch's maxTimestamp
BASE_TIMESTAMP_OFFSET = 27
MAX_TIMESTAMP_OFFSET = 35
N_COLUMNS = 6  # offset, key start, key length, value start, value length, timestamp (ms)
_CRC_POLY = 0x82F63B78  # CRC-32C (Castagnoli), reflected


def _crc_tables() -> np.ndarray:
    """Slicing-by-8 tables: row k advances a byte through k further zero bytes."""
    tables = np.zeros((8, 256), np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ _CRC_POLY if c & 1 else c >> 1
        tables[0, i] = c
    for k in range(1, 8):
        for i in range(256):
            c = int(tables[k - 1, i])
            tables[k, i] = (c >> 8) ^ int(tables[0, c & 0xFF])
    return tables


CRC_TABLES = _crc_tables()
# SSE4.2 has a CRC-32C instruction, several times faster than tables or aiokafka's
# Cython; LLVM cannot emit it for a CPU without the feature, nor when numba
# is told to compile for another CPU (NUMBA_CPU_NAME, NUMBA_CPU_FEATURES).
_TARGET_FEATURES: str = getattr(numba_config, "CPU_FEATURES", None) or (
    "" if getattr(numba_config, "CPU_NAME", None) else llvm.get_host_cpu_features().flatten()
)
HARDWARE_CRC = "+sse4.2" in _TARGET_FEATURES.split(",")


@njit(cache=True, inline="always")
def varint_size(zigzag: int) -> int:
    """Bytes of an unsigned varint (values here are zigzag-encoded, small, non-negative)."""
    size = 1
    while zigzag >= 0x80:
        zigzag >>= 7
        size += 1
    return size


@njit(cache=True, inline="always")
def _varint_bytes(zigzag: int) -> int:
    """The varint's bytes packed little-endian into one int (values below 2**49)."""
    packed = 0
    shift = 0
    while zigzag >= 0x80:
        packed |= ((zigzag & 0x7F) | 0x80) << shift
        zigzag >>= 7
        shift += 8
    return packed | (zigzag << shift)


@njit(cache=True, inline="always")
def put_be(out: np.ndarray, pos: int, value: int, size: int) -> int:
    """Big-endian two's complement integer of `size` bytes."""
    for k in range(size):
        out[pos + size - 1 - k] = (value >> (8 * k)) & 0xFF
    return pos + size


def _array_address(context: Any, builder: Any, array_type: Any, array: Any, pos: Any) -> Any:
    return builder.gep(context.make_array(array_type)(context, builder, array).data, [pos])


def _move_block_typer(typingctx: Any, dst: Any, dst_pos: Any, src: Any, src_pos: Any) -> Any:
    """Copy COPY_BLOCK bytes from src[src_pos:] to dst[dst_pos:]: one unaligned vector move."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        block = ir.VectorType(ir.IntType(8), COPY_BLOCK).as_pointer()
        to = _array_address(context, builder, signature.args[0], args[0], args[1])
        from_ = _array_address(context, builder, signature.args[2], args[2], args[3])
        value = builder.load(builder.bitcast(from_, block), align=1)
        builder.store(value, builder.bitcast(to, block), align=1)
        return context.get_dummy_value()

    return types.void(dst, dst_pos, src, src_pos), codegen


def _store_word_typer(typingctx: Any, dst: Any, dst_pos: Any, value: Any) -> Any:
    """Store an int64 little-endian at dst[dst_pos:dst_pos + 8] (unaligned)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i64 = ir.IntType(64)
        to = _array_address(context, builder, signature.args[0], args[0], args[1])
        builder.store(args[2], builder.bitcast(to, i64.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.void(dst, dst_pos, types.int64), codegen


# Numba's intrinsics compile to the bare load and store: no reference counting of the
# arrays, which inlined helpers with branches leave behind (atomics on every call).
_move_block: Any = intrinsic(_move_block_typer)


_store_word: Any = intrinsic(_store_word_typer)


@njit(cache=True, inline="always")
def copy_bytes(out: np.ndarray, pos: int, src: np.ndarray, start: int, length: int) -> int:
    """out[pos:pos + length] = src[start:start + length], in blocks of COPY_BLOCK bytes.

    A block may read up to COPY_BLOCK - 1 bytes past the span (every source is
    padded by COPY_BLOCK bytes) and write as far past it: `_encode` writes its
    buffer front to back, so later writes replace them, and allocates that slack.
    """
    for k in range(0, length, COPY_BLOCK):
        _move_block(out, pos + k, src, start + k)
    return pos + length


@njit(cache=True, inline="always")
def put_varint(out: np.ndarray, pos: int, zigzag: int) -> int:
    """Write a varint as one word (its spare bytes are overwritten next, as in `copy_bytes`)."""
    _store_word(out, pos, _varint_bytes(zigzag))
    return pos + varint_size(zigzag)


@njit(cache=True, inline="always")
def record_size(offset_delta: int, key_len: int, value_len: int, headers_len: int) -> int:
    """Bytes of a record after its length varint (key_len -1: null key)."""
    key = 1 if key_len < 0 else varint_size(2 * key_len) + key_len
    return (
        2
        + varint_size(2 * offset_delta)
        + key
        + varint_size(2 * value_len)
        + value_len
        + headers_len
    )


@njit(cache=True)
def _partition_order(partition: np.ndarray) -> np.ndarray:
    """Rows by partition, in row order within one: a counting sort over the partition range."""
    low = partition.min()
    span = partition.max() - low + 1
    if span > len(partition) + 1024:  # sparse partition numbers: a stable sort instead
        return np.argsort(partition, kind="mergesort")
    next_slot = np.zeros(span + 1, np.int64)
    for p in partition:
        next_slot[p - low + 1] += 1
    next_slot = np.cumsum(next_slot)
    order = np.empty(len(partition), np.int64)
    for i, p in enumerate(partition):
        order[next_slot[p - low]] = i
        next_slot[p - low] += 1
    return order


@njit(cache=True)
def plan_batches(
    partition: np.ndarray,
    key_len: np.ndarray,
    value_len: np.ndarray,
    header_len: np.ndarray,
    max_batch_bytes: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split each partition's rows, in row order, into batches under max_batch_bytes.

    `header_len` is each row's headers section in bytes (count included).

    A record joins a batch exactly when aiokafka's compiled builder would admit it:
    while the batch stays strictly smaller (its pure-Python fallback also admits a
    batch of exactly max_batch_bytes), and always as the first record of a batch.

    Returns the rows in batch order, each one's record size (without its length
    varint), and per batch: partition, first position in that order, count, bytes.
    """
    n = len(partition)
    order = _partition_order(partition)
    rec_size = np.empty(n, np.int64)
    b_part = np.empty(n, np.int64)
    b_first = np.empty(n, np.int64)
    b_count = np.zeros(n, np.int64)
    b_size = np.empty(n, np.int64)
    nb = -1
    for j in range(n):
        i = order[j]
        new = nb < 0 or partition[i] != b_part[nb]
        body = record_size(0 if new else b_count[nb], key_len[i], value_len[i], header_len[i])
        need = body + varint_size(2 * body)
        if not new and b_size[nb] + need >= max_batch_bytes:
            new = True  # full: this record opens the partition's next batch
            body = record_size(0, key_len[i], value_len[i], header_len[i])
            need = body + varint_size(2 * body)
        if new:
            nb += 1
            b_part[nb], b_first[nb], b_count[nb], b_size[nb] = partition[i], j, 0, HEADER_SIZE
        rec_size[j] = body
        b_count[nb] += 1
        b_size[nb] += need
    nb += 1
    return order, rec_size, b_part[:nb], b_first[:nb], b_count[:nb], b_size[:nb]


@njit(cache=True)
def put_batch_header(out: np.ndarray, pos: int, size: int, count: int, timestamp_ms: int) -> int:
    """The 61-byte batch header, its CRC left zero (see `crc_batches`)."""
    pos = put_be(out, pos, 0, 8)  # baseOffset: the broker assigns it
    pos = put_be(out, pos, size - LENGTH_OFFSET, 4)
    pos = put_be(out, pos, -1, 4)  # partitionLeaderEpoch
    out[pos] = 2  # magic
    pos = put_be(out, pos + 1, 0, 4)  # crc
    pos = put_be(out, pos, 0, 2)  # attributes: no compression, no transaction
    pos = put_be(out, pos, count - 1, 4)  # lastOffsetDelta
    pos = put_be(out, pos, timestamp_ms, 8)  # baseTimestamp
    pos = put_be(out, pos, timestamp_ms, 8)  # maxTimestamp
    pos = put_be(out, pos, NO_PRODUCER[0], 8)
    pos = put_be(out, pos, NO_PRODUCER[1], 2)
    pos = put_be(out, pos, NO_PRODUCER[2], 4)
    return put_be(out, pos, count, 4)


@njit(cache=True)
def _crc32c_tables(buf: np.ndarray, start: int, end: int) -> int:
    """CRC-32C of buf[start:end], slicing by 8."""
    t = CRC_TABLES
    crc = np.uint32(0xFFFFFFFF)
    i = start
    while i + 8 <= end:
        low = crc ^ (
            np.uint32(buf[i])
            | (np.uint32(buf[i + 1]) << 8)
            | (np.uint32(buf[i + 2]) << 16)
            | (np.uint32(buf[i + 3]) << 24)
        )
        crc = (
            t[7, low & 0xFF]
            ^ t[6, (low >> 8) & 0xFF]
            ^ t[5, (low >> 16) & 0xFF]
            ^ t[4, low >> 24]
            ^ t[3, buf[i + 4]]
            ^ t[2, buf[i + 5]]
            ^ t[1, buf[i + 6]]
            ^ t[0, buf[i + 7]]
        )
        i += 8
    while i < end:
        crc = t[0, (crc ^ buf[i]) & 0xFF] ^ (crc >> 8)
        i += 1
    return int(crc ^ np.uint32(0xFFFFFFFF))


def _sse42_crc32_typer(typingctx: Any, crc: Any, data: Any) -> Any:
    """LLVM's x86 CRC-32C step over 8 bytes (the SSE4.2 `crc32` instruction)."""
    name = "llvm.x86.sse42.crc32.64.64"

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i64 = ir.IntType(64)
        fn = builder.module.globals.get(name) or ir.Function(
            builder.module, ir.FunctionType(i64, [i64, i64]), name
        )
        return builder.call(fn, args)

    return types.uint64(types.uint64, types.uint64), codegen


_sse42_crc32_u64: Any = intrinsic(_sse42_crc32_typer)


@njit(cache=True)
def _crc32c_sse42(buf: np.ndarray, start: int, end: int) -> int:
    """CRC-32C of buf[start:end], 8 bytes per instruction (little-endian words)."""
    n_words = (end - start) // 8
    crc = np.uint64(0xFFFFFFFF)
    for word in buf[start : start + 8 * n_words].view(np.uint64):
        crc = _sse42_crc32_u64(crc, word)
    low = np.uint32(crc)
    for i in range(start + 8 * n_words, end):
        low = CRC_TABLES[0, (low ^ buf[i]) & 0xFF] ^ (low >> 8)
    return int(low ^ np.uint32(0xFFFFFFFF))


@njit(cache=True)
def _crc_batches_sse42(out: np.ndarray, at: np.ndarray, size: np.ndarray) -> None:
    """Fill in each batch's CRC (see `_encode`)."""
    for b in range(len(at)):
        crc = _crc32c_sse42(out, at[b] + ATTRIBUTES_OFFSET, at[b] + size[b])
        put_be(out, at[b] + CRC_OFFSET, crc, 4)


@njit(cache=True)
def _crc_batches_tables(out: np.ndarray, at: np.ndarray, size: np.ndarray) -> None:
    """Fill in each batch's CRC (see `_encode`), on CPUs without SSE4.2."""
    for b in range(len(at)):
        crc = _crc32c_tables(out, at[b] + ATTRIBUTES_OFFSET, at[b] + size[b])
        put_be(out, at[b] + CRC_OFFSET, crc, 4)


crc_batches = _crc_batches_sse42 if HARDWARE_CRC else _crc_batches_tables


@njit(cache=True)
def _first_bad_crc_sse42(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> int:
    for b in range(len(starts)):
        if _crc32c_sse42(buf, starts[b] + ATTRIBUTES_OFFSET, ends[b]) != read_be(
            buf, starts[b] + CRC_OFFSET, 4
        ):
            return b
    return -1


@njit(cache=True)
def _first_bad_crc_tables(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> int:
    for b in range(len(starts)):
        if _crc32c_tables(buf, starts[b] + ATTRIBUTES_OFFSET, ends[b]) != read_be(
            buf, starts[b] + CRC_OFFSET, 4
        ):
            return b
    return -1


def first_bad_crc(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> int:
    """Index of the first batch `buf[starts[b]:ends[b]]` whose CRC-32C is wrong; -1 if none."""
    check = _first_bad_crc_sse42 if HARDWARE_CRC else _first_bad_crc_tables
    return int(check(buf, starts, ends))


@njit(cache=True, inline="always")
def read_varint(buf: np.ndarray, pos: int) -> tuple[int, int]:
    """A zigzag varint at `pos`: (value, next position); position -1 past the end."""
    shift = 0
    raw = 0
    while pos < buf.shape[0]:
        b = int(buf[pos])
        pos += 1
        raw |= (b & 0x7F) << shift
        if b < 0x80:
            return (raw >> 1) ^ -(raw & 1), pos
        shift += 7
        if shift > 63:
            return 0, -1
    return 0, -1


@njit(cache=True, inline="always")
def read_be(buf: np.ndarray, pos: int, size: int) -> int:
    """A big-endian integer of `size` bytes at `pos`."""
    value = np.int64(0)
    for k in range(size):
        value = (value << 8) | np.int64(buf[pos + k])
    return int(value)


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
        length = read_be(buf, pos + 8, 4)
        end = pos + 12 + length
        if end > n:
            break
        legacy = buf[pos + 16] != 2 or length < HEADER_SIZE - 12
        if legacy or read_be(buf, pos + 21, 2) & ATTR_UNSUPPORTED:
            status = 1
        starts.append(pos)
        ends.append(end)
        pos = end
    return np.array(starts, np.int64), np.array(ends, np.int64), status


@njit(cache=True)
def parse_batches(
    buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, fetch_offset: int, stop_at_gap: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Offsets, key/value spans and timestamps of the records at or after `fetch_offset`.

    Returns (offset, key_start, key_len, value_start, value_len, timestamp_ms,
    next_offset, status); status 0 is success, 2 a malformed record, 3 a gap: with
    `stop_at_gap`, parsing stops before a batch that starts after the offset the
    previous one ended at, and `next_offset` is that missing offset.
    """
    total = 0
    for b in range(starts.shape[0]):
        total += read_be(buf, starts[b] + 57, 4)
    cols = np.empty((N_COLUMNS, total), np.int64)
    k, next_offset, status = parse_into(buf, starts, ends, fetch_offset, stop_at_gap, cols, 0)
    return (
        cols[0, :k],
        cols[1, :k],
        cols[2, :k],
        cols[3, :k],
        cols[4, :k],
        cols[5, :k],
        next_offset,
        status,
    )


@njit(cache=True)
def parse_into(
    buf: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    fetch_offset: int,
    stop_at_gap: bool,
    cols: np.ndarray,
    k: int,
) -> tuple[int, int, int]:
    """`parse_batches` writing into `cols` (`N_COLUMNS` rows) from column `k`.

    Returns (new k, next offset, status); a malformed record returns next offset 0
    and status 2. A record's timestamp is its batch's base timestamp plus its delta
    (CreateTime), or the batch's max timestamp (LogAppendTime).
    """
    next_offset = fetch_offset
    for b in range(starts.shape[0]):
        start, end = starts[b], ends[b]
        base = read_be(buf, start, 8)
        if stop_at_gap and base > next_offset:
            return k, next_offset, 3
        count = read_be(buf, start + 57, 4)
        base_ts = read_be(buf, start + BASE_TIMESTAMP_OFFSET, 8)
        log_append = read_be(buf, start + ATTRIBUTES_OFFSET, 2) & ATTR_LOG_APPEND_TIME
        if log_append:
            base_ts = read_be(buf, start + MAX_TIMESTAMP_OFFSET, 8)
        pos = start + HEADER_SIZE
        for _ in range(count):
            length, pos = read_varint(buf, pos)
            if pos < 0 or pos + length > end:
                return k, 0, 2
            record_end = pos + length
            pos += 1  # attributes
            ts_delta, pos = read_varint(buf, pos)
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
            cols[5, k] = base_ts if log_append else base_ts + ts_delta
            k += 1
        # v2 keeps the last offset even when compaction removed records
        next_offset = max(next_offset, base + read_be(buf, start + 23, 4) + 1)
    return k, next_offset, 0


@njit(cache=True)
def find_header(
    buf: np.ndarray, value_start: np.ndarray, value_len: np.ndarray, key: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Records of `parse_batches` spans that carry header `key`: (record, value start, length).

    A record's headers follow its value; most records have none, which costs one
    byte read here (a count of 0). Spans that do not index a v2 record set (the
    aiokafka fallback of `stream.kafka.fetched`) hold no well-formed header
    there, so nothing is found for them; every read is bounds-checked.

    >>> from aiokafka.record.default_records import DefaultRecordBatchBuilder
    >>> b = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1 << 20)
    >>> _ = b.append(0, timestamp=1, key=b"k", value=b"v0", headers=[])
    >>> _ = b.append(1, timestamp=1, key=None, value=b"v1", headers=[("a", b"1"), ("tp", b"xy")])
    >>> buf = np.frombuffer(bytes(b.build()), np.uint8)
    >>> _, ks, kl, vs, vl, _, _, _ = parse_batches(buf, *batch_bounds(buf)[:2], 0, True)
    >>> rows, at, size = find_header(buf, vs, vl, np.frombuffer(b"tp", np.uint8))
    >>> rows.tolist(), buf[at[0] : at[0] + size[0]].tobytes()
    ([1], b'xy')
    """
    rows = []
    starts = []
    lengths = []
    n = buf.shape[0]
    for i in range(value_start.shape[0]):
        pos = value_start[i] + max(value_len[i], 0)
        if pos >= n or buf[pos] == 0:
            continue  # no headers: the common case
        count, pos = read_varint(buf, pos)
        for _ in range(max(count, 0)):
            if pos < 0:
                break
            klen, pos = read_varint(buf, pos)
            if pos < 0 or klen < 0 or pos + klen > n:
                break
            kpos = pos
            pos += klen
            vlen, pos = read_varint(buf, pos)
            if pos < 0 or pos + max(vlen, 0) > n:
                break
            if klen == key.shape[0] and vlen >= 0 and np.all(buf[kpos : kpos + klen] == key):
                rows.append(i)
                starts.append(pos)
                lengths.append(vlen)
                break
            pos += max(vlen, 0)
    return np.array(rows, np.int64), np.array(starts, np.int64), np.array(lengths, np.int64)
