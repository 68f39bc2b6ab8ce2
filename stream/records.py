"""Kafka record batches of signals built in bulk: a micro-batch's signals -> message format v2.

`encode_signal_batches` writes the JSON value of every signal (byte for byte what
`stream.signal.encode_signals` gives) straight into complete Kafka record batches
(magic 2, uncompressed), one or more per output partition, in one Numba pass.
`PrebuiltBatch` hands such a batch to `AIOKafkaProducer.send_batch` in place of
aiokafka's own `BatchBuilder`, so no Python runs per record on the produce path.

Scores are never formatted here: `orjson` writes them all at once (shortest
round-trip repr, NaN as null, as `encode_signals` does per score) and the kernel
cuts that array's text into per-row spans.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.record.util import calc_crc32c, encode_varint
from llvmlite import binding as llvm
from llvmlite import ir
from numba import config as numba_config
from numba import njit, types
from numba.extending import intrinsic

from stream.fetch import _be, read_varint
from stream.signal import DOWN, FLAT, UP

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
DEFAULT_MAX_BATCH_BYTES = 256 * 1024  # stream.kafka.make_producer's max_batch_size

# Pieces of the signal template around the per-row fields (see stream.signal._TEMPLATE).
P_SYMBOL, P_TRADE_ID, P_EVENT_NS, P_RECV_NS = 0, 1, 2, 3
P_READY_MID, P_FLAT_MID = 4, 5  # emit_ns .. "score": with the version or ""
P_UP_TAIL, P_DOWN_TAIL, P_FLAT_TAIL = 6, 7, 8  # direction and ready, closing brace

# Byte copies go by 32-byte vector moves (one instruction with AVX): a numba byte loop
# costs ~1.3 ns/byte here (each signed index is checked for wraparound), 3/4 of the
# kernel's time before. Varints go as one 8-byte store. Both assume a little-endian CPU.
COPY_BLOCK = 32
_DIGIT_PAIRS = np.frombuffer(b"".join(b"%02d" % i for i in range(100)), np.uint8)
_PADDING = bytes(COPY_BLOCK)
_POW10 = np.array([10**k for k in range(19)], np.int64)

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
# SSE4.2 has a CRC-32C instruction (~11 GB/s here against ~2 GB/s for tables or
# aiokafka's Cython); LLVM cannot emit it for a CPU without the feature, nor when numba
# is told to compile for another CPU (NUMBA_CPU_NAME, NUMBA_CPU_FEATURES).
_TARGET_FEATURES: str = getattr(numba_config, "CPU_FEATURES", None) or (
    "" if getattr(numba_config, "CPU_NAME", None) else llvm.get_host_cpu_features().flatten()
)
HARDWARE_CRC = "+sse4.2" in _TARGET_FEATURES.split(",")


@njit(cache=True, inline="always")
def _varint_size(zigzag: int) -> int:
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
def _put_be(out: np.ndarray, pos: int, value: int, size: int) -> int:
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
# arrays, which inlined helpers with branches leave behind (atomics, ~20 ns a call).
_move_block: Any = intrinsic(_move_block_typer)
_store_word: Any = intrinsic(_store_word_typer)


@njit(cache=True, inline="always")
def _copy(out: np.ndarray, pos: int, src: np.ndarray, start: int, length: int) -> int:
    """out[pos:pos + length] = src[start:start + length], in blocks of COPY_BLOCK bytes.

    A block may read up to COPY_BLOCK - 1 bytes past the span (every source is
    padded by COPY_BLOCK bytes) and write as far past it: `_encode` writes its
    buffer front to back, so later writes replace them, and allocates that slack.
    """
    for k in range(0, length, COPY_BLOCK):
        _move_block(out, pos + k, src, start + k)
    return pos + length


@njit(cache=True, inline="always")
def _put_varint(out: np.ndarray, pos: int, zigzag: int) -> int:
    """Write a varint as one word (its spare bytes are overwritten next, as in `_copy`)."""
    _store_word(out, pos, _varint_bytes(zigzag))
    return pos + _varint_size(zigzag)


@njit(cache=True, inline="always")
def _digits(magnitude: int) -> int:
    """Decimal digits of a non-negative int64."""
    size = 1
    while size < 19 and magnitude >= _POW10[size]:
        size += 1
    return size


@njit(cache=True, inline="always")
def _int_size(value: int) -> int:
    """Characters of the decimal representation, sign included."""
    if value >= 0:
        return _digits(value)
    return 2 + _digits(value // -10) - (value > -10)


@njit(cache=True, inline="always")
def _put_digits(out: np.ndarray, end: int, magnitude: int, count: int) -> None:
    """The last `count` decimal digits of a non-negative `magnitude`, ending before `end`."""
    for k in range(0, count - 1, 2):
        rest = magnitude // 100
        pair = 2 * (magnitude - 100 * rest)
        out[end - k - 1] = _DIGIT_PAIRS[pair + 1]
        out[end - k - 2] = _DIGIT_PAIRS[pair]
        magnitude = rest
    for _ in range(count % 2):  # the odd leading digit (a loop, not a branch: see intrinsics)
        out[end - count] = 48 + magnitude


@njit(cache=True, inline="always")
def _put_int(out: np.ndarray, pos: int, value: int, size: int) -> int:
    """Write `value` in decimal into exactly `size` bytes (from `_int_size`)."""
    end = pos + size
    if value >= 0:
        _put_digits(out, end, value, size)
    else:  # sign, last digit, then the rest: -value may not fit an int64
        out[pos] = 45
        out[end - 1] = 48 - value % -10
        _put_digits(out, end - 1, value // -10, size - 2)
    return end


@njit(cache=True, inline="always")
def _record_size(offset_delta: int, key_len: int, value_len: int, headers_len: int) -> int:
    """Bytes of a record after its length varint (key_len -1: null key)."""
    key = 1 if key_len < 0 else _varint_size(2 * key_len) + key_len
    return (2 + _varint_size(2 * offset_delta) + key + _varint_size(2 * value_len) + value_len
            + headers_len)  # fmt: skip


@njit(cache=True)
def _score_spans(scores_json: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut orjson's `[a,b,...]` into per-row spans (numbers and null hold no commas)."""
    start = np.empty(n, np.int64)
    length = np.empty(n, np.int64)
    pos = 1
    for i in range(n):
        start[i] = pos
        while scores_json[pos] != 44 and scores_json[pos] != 93:  # ',' ']'
            pos += 1
        length[i] = pos - start[i]
        pos += 1
    if pos != len(scores_json) - COPY_BLOCK:
        raise ValueError("scores text does not hold one value per row")
    return start, length


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
def _value_sizes(
    text_len: int, sym_start: np.ndarray, sym_len: np.ndarray, key_start: np.ndarray,
    key_len: np.ndarray, tid_start: np.ndarray, tid_len: np.ndarray, event_ns: np.ndarray,
    recv_ns: np.ndarray, scores: np.ndarray, threshold: float, score_len: np.ndarray,
    piece_at: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Per row: the tail piece (direction), value size, and the sizes of both times."""
    n = len(scores)
    tail = np.empty(n, np.int64)
    value_len = np.empty(n, np.int64)
    ev_size = np.empty(n, np.int64)
    rv_size = np.empty(n, np.int64)
    fixed = piece_at[P_READY_MID] - piece_at[P_SYMBOL]  # the symbol .. recv_ns pieces
    size_of = piece_at[1:] - piece_at[:-1]
    for i in range(n):
        if (_outside(sym_start[i], sym_len[i], text_len)
                or _outside(tid_start[i], tid_len[i], text_len)
                or (key_len[i] >= 0 and _outside(key_start[i], key_len[i], text_len))):  # fmt: skip
            raise ValueError("a text span lies outside the text buffer")
        s = scores[i]
        if s != s:  # NaN: not ready
            tail[i] = P_FLAT_TAIL
            mid = size_of[P_FLAT_MID]
        else:
            tail[i] = P_UP_TAIL if s >= threshold else P_DOWN_TAIL
            mid = size_of[P_READY_MID]
        ev_size[i] = _int_size(event_ns[i])
        rv_size[i] = _int_size(recv_ns[i])
        value_len[i] = (fixed + sym_len[i] + tid_len[i] + ev_size[i] + rv_size[i] + mid
                        + score_len[i] + size_of[tail[i]])  # fmt: skip
    return tail, value_len, ev_size, rv_size


@njit(cache=True, inline="always")
def _outside(start: int, length: int, limit: int) -> bool:
    return start < 0 or length < 0 or start + length > limit


@njit(cache=True)
def _plan_batches(
    partition: np.ndarray, key_len: np.ndarray, value_len: np.ndarray, header_len: int,
    max_batch_bytes: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Split each partition's rows, in row order, into batches under max_batch_bytes.

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
        body = _record_size(0 if new else b_count[nb], key_len[i], value_len[i], header_len)
        need = body + _varint_size(2 * body)
        if not new and b_size[nb] + need >= max_batch_bytes:
            new = True  # full: this record opens the partition's next batch
            body = _record_size(0, key_len[i], value_len[i], header_len)
            need = body + _varint_size(2 * body)
        if new:
            nb += 1
            b_part[nb], b_first[nb], b_count[nb], b_size[nb] = partition[i], j, 0, HEADER_SIZE
        rec_size[j] = body
        b_count[nb] += 1
        b_size[nb] += need
    nb += 1
    return order, rec_size, b_part[:nb], b_first[:nb], b_count[:nb], b_size[:nb]


@njit(cache=True)
def _put_batch_header(out: np.ndarray, pos: int, size: int, count: int, timestamp_ms: int) -> int:
    """The 61-byte batch header, its CRC left zero (see `_crc_batches`)."""
    pos = _put_be(out, pos, 0, 8)  # baseOffset: the broker assigns it
    pos = _put_be(out, pos, size - LENGTH_OFFSET, 4)
    pos = _put_be(out, pos, -1, 4)  # partitionLeaderEpoch
    out[pos] = 2  # magic
    pos = _put_be(out, pos + 1, 0, 4)  # crc
    pos = _put_be(out, pos, 0, 2)  # attributes: no compression, no transaction
    pos = _put_be(out, pos, count - 1, 4)  # lastOffsetDelta
    pos = _put_be(out, pos, timestamp_ms, 8)  # baseTimestamp
    pos = _put_be(out, pos, timestamp_ms, 8)  # maxTimestamp
    pos = _put_be(out, pos, NO_PRODUCER[0], 8)
    pos = _put_be(out, pos, NO_PRODUCER[1], 2)
    pos = _put_be(out, pos, NO_PRODUCER[2], 4)
    return _put_be(out, pos, count, 4)


@njit(cache=True)
def _encode(
    text: np.ndarray, sym_start: np.ndarray, sym_len: np.ndarray,
    key_start: np.ndarray, key_len: np.ndarray, tid_start: np.ndarray, tid_len: np.ndarray,
    event_ns: np.ndarray, recv_ns: np.ndarray, scores: np.ndarray, threshold: float,
    scores_json: np.ndarray, partition: np.ndarray, pieces: np.ndarray, piece_at: np.ndarray,
    timestamp_ms: int, header_block: np.ndarray, header_len: int, max_batch_bytes: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """All record batches of a micro-batch in one buffer (CRCs left to `_crc_batches`).

    Returns the buffer and, per batch: partition, byte offset, byte size, record count.
    """
    score_start, score_len = _score_spans(scores_json, len(scores))
    tail, value_len, ev_size, rv_size = _value_sizes(
        len(text) - COPY_BLOCK, sym_start, sym_len, key_start, key_len, tid_start, tid_len,
        event_ns, recv_ns, scores, threshold, score_len, piece_at,
    )  # fmt: skip
    order, rec_size, b_part, b_first, b_count, b_size = _plan_batches(
        partition, key_len, value_len, header_len, max_batch_bytes
    )
    b_at = np.cumsum(b_size) - b_size
    out = np.empty(b_at[-1] + b_size[-1] + COPY_BLOCK, np.uint8)  # slack: see _copy
    size_of = piece_at[1:] - piece_at[:-1]
    for b in range(len(b_at)):
        pos = _put_batch_header(out, b_at[b], b_size[b], b_count[b], timestamp_ms)
        for k in range(b_count[b]):
            j = b_first[b] + k
            i = order[j]
            pos = _put_varint(out, pos, 2 * rec_size[j])
            out[pos] = 0  # attributes
            out[pos + 1] = 0  # timestampDelta: one timestamp for the whole batch
            pos = _put_varint(out, pos + 2, 2 * k)  # offsetDelta
            if key_len[i] < 0:
                pos = _put_varint(out, pos, 1)  # null key
            else:
                pos = _put_varint(out, pos, 2 * key_len[i])
                pos = _copy(out, pos, text, key_start[i], key_len[i])
            pos = _put_varint(out, pos, 2 * value_len[i])
            pos = _copy(out, pos, pieces, piece_at[P_SYMBOL], size_of[P_SYMBOL])
            pos = _copy(out, pos, text, sym_start[i], sym_len[i])
            pos = _copy(out, pos, pieces, piece_at[P_TRADE_ID], size_of[P_TRADE_ID])
            pos = _copy(out, pos, text, tid_start[i], tid_len[i])
            pos = _copy(out, pos, pieces, piece_at[P_EVENT_NS], size_of[P_EVENT_NS])
            pos = _put_int(out, pos, event_ns[i], ev_size[i])
            pos = _copy(out, pos, pieces, piece_at[P_RECV_NS], size_of[P_RECV_NS])
            pos = _put_int(out, pos, recv_ns[i], rv_size[i])
            mid = P_FLAT_MID if tail[i] == P_FLAT_TAIL else P_READY_MID
            pos = _copy(out, pos, pieces, piece_at[mid], size_of[mid])
            pos = _copy(out, pos, scores_json, score_start[i], score_len[i])
            pos = _copy(out, pos, pieces, piece_at[tail[i]], size_of[tail[i]])
            pos = _copy(out, pos, header_block, 0, header_len)
    return out, b_part, b_at, b_size, b_count


@njit(cache=True)
def _crc32c_tables(buf: np.ndarray, start: int, end: int) -> int:
    """CRC-32C of buf[start:end], slicing by 8."""
    t = CRC_TABLES
    crc = np.uint32(0xFFFFFFFF)
    i = start
    while i + 8 <= end:
        low = crc ^ (np.uint32(buf[i]) | (np.uint32(buf[i + 1]) << 8)
                     | (np.uint32(buf[i + 2]) << 16) | (np.uint32(buf[i + 3]) << 24))  # fmt: skip
        crc = (t[7, low & 0xFF] ^ t[6, (low >> 8) & 0xFF] ^ t[5, (low >> 16) & 0xFF]
               ^ t[4, low >> 24] ^ t[3, buf[i + 4]] ^ t[2, buf[i + 5]] ^ t[1, buf[i + 6]]
               ^ t[0, buf[i + 7]])  # fmt: skip
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
        _put_be(out, at[b] + CRC_OFFSET, crc, 4)


@njit(cache=True)
def _crc_batches_tables(out: np.ndarray, at: np.ndarray, size: np.ndarray) -> None:
    """Fill in each batch's CRC (see `_encode`), on CPUs without SSE4.2."""
    for b in range(len(at)):
        crc = _crc32c_tables(out, at[b] + ATTRIBUTES_OFFSET, at[b] + size[b])
        _put_be(out, at[b] + CRC_OFFSET, crc, 4)


_crc_batches = _crc_batches_sse42 if HARDWARE_CRC else _crc_batches_tables


@njit(cache=True)
def _first_bad_crc_sse42(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> int:
    for b in range(len(starts)):
        if _crc32c_sse42(buf, starts[b] + ATTRIBUTES_OFFSET, ends[b]) != _be(
            buf, starts[b] + CRC_OFFSET, 4
        ):
            return b
    return -1


@njit(cache=True)
def _first_bad_crc_tables(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> int:
    for b in range(len(starts)):
        if _crc32c_tables(buf, starts[b] + ATTRIBUTES_OFFSET, ends[b]) != _be(
            buf, starts[b] + CRC_OFFSET, 4
        ):
            return b
    return -1


def first_bad_crc(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> int:
    """Index of the first batch `buf[starts[b]:ends[b]]` whose CRC-32C is wrong; -1 if none."""
    check = _first_bad_crc_sse42 if HARDWARE_CRC else _first_bad_crc_tables
    return int(check(buf, starts, ends))


def _template_pieces(emit_ns: int, model: str, version: str) -> tuple[np.ndarray, np.ndarray]:
    """The constant parts of stream.signal._TEMPLATE for this call, indexed by P_*."""
    dumps = orjson.dumps
    mid = b',"emit_ns":%d,"model":%b,"version":' % (emit_ns, dumps(model))
    pieces = (
        b'{"symbol":"', b'","trade_id":"', b'","event_ns":', b',"recv_ns":',
        mid + dumps(version) + b',"score":', mid + dumps("") + b',"score":',
        b',"direction":%d,"ready":true}' % UP, b',"direction":%d,"ready":true}' % DOWN,
        b',"direction":%d,"ready":false}' % FLAT,
    )  # fmt: skip
    at = np.zeros(len(pieces) + 1, np.int64)
    np.cumsum([len(p) for p in pieces], out=at[1:])
    return np.frombuffer(b"".join(pieces) + _PADDING, np.uint8), at


def _header_block(headers: Sequence[tuple[str, bytes | None]]) -> tuple[np.ndarray, int]:
    """A record's headers section (count, then each key and value) and its length.

    The same for every record; padded for block copies (see `_copy`).
    """
    block = bytearray()
    encode_varint(len(headers), block.append)
    for key, value in headers:
        key_b = key.encode()
        encode_varint(len(key_b), block.append)
        block += key_b
        encode_varint(-1 if value is None else len(value), block.append)
        block += value or b""
    return np.frombuffer(bytes(block) + _PADDING, np.uint8), len(block)


def encode_signal_batches(
    text: np.ndarray,
    *,
    sym_start: np.ndarray, sym_len: np.ndarray,
    key_start: np.ndarray, key_len: np.ndarray,
    tid_start: np.ndarray, tid_len: np.ndarray,
    event_ns: np.ndarray, recv_ns: np.ndarray,
    emit_ns: int, model: str, version: str,
    scores: np.ndarray, threshold: float,
    partition: np.ndarray, timestamp_ms: int,
    headers: Sequence[tuple[str, bytes | None]] = (),
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    stamp_last: Callable[[], int] | None = None,
) -> list[tuple[int, bytes, int]]:  # fmt: skip
    """Kafka record batches (magic 2, uncompressed) holding one signal per row.

    Each value is byte for byte what `stream.signal.encode_signals` writes for the
    row (a NaN score stands for None: not ready). Rows go to their `partition`, in
    row order; a partition's rows fill as many batches as `max_batch_bytes` needs,
    split where aiokafka's `BatchBuilder` would split them.

    Args:
        text: uint8 buffer that the spans below point into.
        sym_start: Per row, where the symbol's JSON string content starts in `text`
            (escaped, without quotes: `orjson.dumps(symbol)[1:-1]`).
        sym_len: Its length in bytes.
        key_start: Where the record key starts.
        key_len: Its length (-1: null key).
        tid_start: Where the trade id's JSON string content starts.
        tid_len: Its length.
        event_ns: int64 event times.
        recv_ns: int64 receive times.
        emit_ns: When the micro-batch was scored (the same for every row).
        model: Model name.
        version: Model version (written for scored rows; "" for the others).
        scores: float64 P(up), NaN where the features were not ready.
        threshold: UP at or above it, DOWN below.
        partition: int64 output partition per row.
        timestamp_ms: The records' timestamp (the same for every record).
        headers: Headers of every record, such as the stage timing header.
        max_batch_bytes: A batch stays smaller than this (a record that alone does not
            still goes, alone).
        stamp_last: If given, called once the records are built (before their CRCs):
            its value, little-endian int64, replaces the last 8 bytes of every
            record's last header value (the "encoded" time of the stage header).

    Returns:
        (partition, batch bytes, record count) per batch, by partition, then row order.

    >>> from aiokafka.record.default_records import DefaultRecordBatch
    >>> from stream.signal import Signal
    >>> at = np.array([0]), np.array([3])  # "BTC" at 0, trade id "7" at 3
    >>> [(p, data, n)] = encode_signal_batches(
    ...     np.frombuffer(b"BTC7", np.uint8), sym_start=at[0], sym_len=at[1],
    ...     key_start=at[0], key_len=at[1], tid_start=at[1], tid_len=at[1] - 2,
    ...     event_ns=at[1], recv_ns=at[1], emit_ns=9, model="m", version="4",
    ...     scores=np.array([0.75]), threshold=0.5, partition=np.array([2]), timestamp_ms=5)
    >>> [record] = DefaultRecordBatch(data)
    >>> signal = Signal.decode(record.value)
    >>> p, n, record.key, signal.symbol, signal.trade_id, signal.score, signal.direction
    (2, 1, b'BTC', 'BTC', '7', 0.75, 1)
    """
    n = len(partition)
    per_row = (sym_start, sym_len, key_start, key_len, tid_start, tid_len, event_ns, recv_ns,
               partition)  # fmt: skip
    columns = [np.ascontiguousarray(c, np.int64) for c in per_row]
    scores = np.ascontiguousarray(scores, np.float64)
    if any(len(c) != n for c in columns) or len(scores) != n:
        raise ValueError("every per-row array must have one entry per row")
    if n == 0:
        return []
    # same text as orjson.dumps(scores.tolist()) (NaN -> null), without the list
    scores_text = orjson.dumps(scores, option=orjson.OPT_SERIALIZE_NUMPY)
    scores_json = np.frombuffer(scores_text + _PADDING, np.uint8)
    padded_text = np.empty(len(text) + COPY_BLOCK, np.uint8)  # sources are padded: see _copy
    padded_text[: len(text)] = text
    pieces, piece_at = _template_pieces(emit_ns, model, version)
    s_start, s_len, k_start, k_len, t_start, t_len, ev, rv, part = columns
    out, b_part, b_at, b_size, b_count = _encode(
        padded_text, s_start, s_len, k_start, k_len, t_start, t_len,
        ev, rv, scores, float(threshold), scores_json, part, pieces, piece_at,
        int(timestamp_ms), *_header_block(headers), int(max_batch_bytes),
    )  # fmt: skip
    if stamp_last is not None:
        if not headers or len(headers[-1][1] or b"") < 8:
            raise ValueError("stamp_last needs a last header value of at least 8 bytes")
        _stamp_tails(out, b_at, b_count, np.int64(stamp_last()))
    _crc_batches(out, b_at, b_size)
    return [
        (p, out[at : at + size].tobytes(), count)
        for p, at, size, count in zip(
            b_part.tolist(), b_at.tolist(), b_size.tolist(), b_count.tolist(), strict=True
        )
    ]


@njit(cache=True)
def _stamp_tails(out: np.ndarray, b_at: np.ndarray, b_count: np.ndarray, value: np.int64) -> None:
    """Write `value` into the last 8 bytes of every record of the batches."""
    tail = np.empty(1, np.int64)
    tail[0] = value
    stamp = tail.view(np.uint8)  # little-endian, as struct "<q" packs it
    for b in range(b_at.shape[0]):
        pos = b_at[b] + HEADER_SIZE
        for _ in range(b_count[b]):
            length, pos = read_varint(out, pos)  # the record's length
            end = pos + length
            out[end - 8 : end] = stamp
            pos = end


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
    producer: AIOKafkaProducer, topic: str, batches: list[tuple[int, bytes, int]]
) -> list[asyncio.Future[Any]]:
    """Queue the batches of `encode_signal_batches`; the futures resolve on the broker's acks.

    Batches of one partition are queued in order (aiokafka keeps one in flight per
    partition, so they land in order).
    """
    return [
        await producer.send_batch(PrebuiltBatch(data, count), topic, partition=p)
        for p, data, count in batches
    ]


def warm_up() -> None:
    """Load (or compile) the kernels now, so the first micro-batch does not pay for it."""
    one = np.ones(1, np.int64)
    encode_signal_batches(
        np.frombuffer(b"A", np.uint8), sym_start=one - 1, sym_len=one, key_start=one - 1,
        key_len=one, tid_start=one - 1, tid_len=one, event_ns=one, recv_ns=one, emit_ns=1,
        model="m", version="1", scores=np.full(1, 0.5), threshold=0.5, partition=one,
        timestamp_ms=1, headers=[("t", b"")],
    )  # fmt: skip
