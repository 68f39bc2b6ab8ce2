"""Kafka record batches of signals built in bulk: a micro-batch's signals -> message format v2.

`encode_signal_batches` writes the JSON value of every signal (byte for byte what
`stream.contracts.signal.encode_signals` gives) straight into complete Kafka record batches
(magic 2, uncompressed), one or more per output partition, in one Numba pass.
`PrebuiltBatch` hands such a batch to `AIOKafkaProducer.send_batch` in place of
aiokafka's own `BatchBuilder`, so no Python runs per record on the produce path.

Scores are never formatted here: `orjson` writes them all at once (shortest
round-trip repr, NaN as null, as `encode_signals` does per score) and the kernel
cuts that array's text into per-row spans.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import orjson
from aiokafka.record.util import encode_varint
from numba import njit

from stream.contracts.signal import DOWN, ERROR_FIELD, FLAT, SCHEMA_VERSION, UP
from stream.kafka.recordbatch import (
    COPY_BLOCK,
    DEFAULT_MAX_BATCH_BYTES,
    HEADER_SIZE,
    PADDING,
    copy_bytes,
    crc_batches,
    plan_batches,
    put_batch_header,
    put_varint,
    read_varint,
)

# Pieces of the signal template around the per-row fields (see stream.contracts.signal._TEMPLATE).
P_SYMBOL, P_TRADE_ID, P_EVENT_NS, P_RECV_NS, P_PARTITION, P_OFFSET = 0, 1, 2, 3, 4, 5
P_READY_MID, P_FLAT_MID = 6, 7  # emit_ns .. "score": with the version or ""
P_UP_TAIL, P_DOWN_TAIL, P_FLAT_TAIL, P_ERROR_TAIL = 8, 9, 10, 11  # direction .. closing brace

_DIGIT_PAIRS = np.frombuffer(b"".join(b"%02d" % i for i in range(100)), np.uint8)
_POW10 = np.array([10**k for k in range(19)], np.int64)


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
def _value_sizes(
    text_len: int,
    sym_start: np.ndarray,
    sym_len: np.ndarray,
    key_start: np.ndarray,
    key_len: np.ndarray,
    tid_start: np.ndarray,
    tid_len: np.ndarray,
    event_ns: np.ndarray,
    recv_ns: np.ndarray,
    tick_partition: np.ndarray,
    tick_offset: np.ndarray,
    ready: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    score_len: np.ndarray,
    piece_at: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row: the tail piece (direction), value size, and the sizes of its integers."""
    n = len(scores)
    tail = np.empty(n, np.int64)
    value_len = np.empty(n, np.int64)
    ev_size = np.empty(n, np.int64)
    rv_size = np.empty(n, np.int64)
    tp_size = np.empty(n, np.int64)
    to_size = np.empty(n, np.int64)
    fixed = piece_at[P_READY_MID] - piece_at[P_SYMBOL]  # the symbol .. recv_ns pieces
    size_of = piece_at[1:] - piece_at[:-1]
    for i in range(n):
        if (
            _outside(sym_start[i], sym_len[i], text_len)
            or _outside(tid_start[i], tid_len[i], text_len)
            or (key_len[i] >= 0 and _outside(key_start[i], key_len[i], text_len))
        ):
            raise ValueError("a text span lies outside the text buffer")
        s = scores[i]
        if not ready[i]:
            tail[i] = P_FLAT_TAIL
            mid = size_of[P_FLAT_MID]
        elif not -math.inf < s < math.inf:  # NaN or infinite: the model failed on the row
            tail[i] = P_ERROR_TAIL
            mid = size_of[P_READY_MID]
        else:
            tail[i] = P_UP_TAIL if s >= threshold else P_DOWN_TAIL
            mid = size_of[P_READY_MID]
        ev_size[i] = _int_size(event_ns[i])
        rv_size[i] = _int_size(recv_ns[i])
        tp_size[i] = _int_size(tick_partition[i])
        to_size[i] = _int_size(tick_offset[i])
        value_len[i] = (
            fixed
            + sym_len[i]
            + tid_len[i]
            + ev_size[i]
            + rv_size[i]
            + tp_size[i]
            + to_size[i]
            + mid
            + score_len[i]
            + size_of[tail[i]]
        )
    return tail, value_len, ev_size, rv_size, tp_size, to_size


@njit(cache=True, inline="always")
def _outside(start: int, length: int, limit: int) -> bool:
    return start < 0 or length < 0 or start + length > limit


@njit(cache=True)
def _encode(
    text: np.ndarray,
    sym_start: np.ndarray,
    sym_len: np.ndarray,
    key_start: np.ndarray,
    key_len: np.ndarray,
    tid_start: np.ndarray,
    tid_len: np.ndarray,
    event_ns: np.ndarray,
    recv_ns: np.ndarray,
    tick_partition: np.ndarray,
    tick_offset: np.ndarray,
    ready: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    scores_json: np.ndarray,
    partition: np.ndarray,
    pieces: np.ndarray,
    piece_at: np.ndarray,
    timestamp_ms: int,
    header_blocks: np.ndarray,
    header_start: np.ndarray,
    header_len: np.ndarray,
    max_batch_bytes: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All record batches of a micro-batch in one buffer (CRCs left to `crc_batches`).

    Returns the buffer and, per batch: partition, byte offset, byte size, record count.
    """
    score_start, score_len = _score_spans(scores_json, len(scores))
    tail, value_len, ev_size, rv_size, tp_size, to_size = _value_sizes(
        len(text) - COPY_BLOCK,
        sym_start,
        sym_len,
        key_start,
        key_len,
        tid_start,
        tid_len,
        event_ns,
        recv_ns,
        tick_partition,
        tick_offset,
        ready,
        scores,
        threshold,
        score_len,
        piece_at,
    )
    order, rec_size, b_part, b_first, b_count, b_size = plan_batches(
        partition, key_len, value_len, header_len, max_batch_bytes
    )
    b_at = np.cumsum(b_size) - b_size
    out = np.empty(b_at[-1] + b_size[-1] + COPY_BLOCK, np.uint8)  # slack: see copy_bytes
    size_of = piece_at[1:] - piece_at[:-1]
    for b in range(len(b_at)):
        pos = put_batch_header(out, b_at[b], b_size[b], b_count[b], timestamp_ms)
        for k in range(b_count[b]):
            j = b_first[b] + k
            i = order[j]
            pos = put_varint(out, pos, 2 * rec_size[j])
            out[pos] = 0  # attributes
            out[pos + 1] = 0  # timestampDelta: one timestamp for the whole batch
            pos = put_varint(out, pos + 2, 2 * k)  # offsetDelta
            if key_len[i] < 0:
                pos = put_varint(out, pos, 1)  # null key
            else:
                pos = put_varint(out, pos, 2 * key_len[i])
                pos = copy_bytes(out, pos, text, key_start[i], key_len[i])
            pos = put_varint(out, pos, 2 * value_len[i])
            pos = copy_bytes(out, pos, pieces, piece_at[P_SYMBOL], size_of[P_SYMBOL])
            pos = copy_bytes(out, pos, text, sym_start[i], sym_len[i])
            pos = copy_bytes(out, pos, pieces, piece_at[P_TRADE_ID], size_of[P_TRADE_ID])
            pos = copy_bytes(out, pos, text, tid_start[i], tid_len[i])
            pos = copy_bytes(out, pos, pieces, piece_at[P_EVENT_NS], size_of[P_EVENT_NS])
            pos = _put_int(out, pos, event_ns[i], ev_size[i])
            pos = copy_bytes(out, pos, pieces, piece_at[P_RECV_NS], size_of[P_RECV_NS])
            pos = _put_int(out, pos, recv_ns[i], rv_size[i])
            pos = copy_bytes(out, pos, pieces, piece_at[P_PARTITION], size_of[P_PARTITION])
            pos = _put_int(out, pos, tick_partition[i], tp_size[i])
            pos = copy_bytes(out, pos, pieces, piece_at[P_OFFSET], size_of[P_OFFSET])
            pos = _put_int(out, pos, tick_offset[i], to_size[i])
            mid = P_FLAT_MID if tail[i] == P_FLAT_TAIL else P_READY_MID
            pos = copy_bytes(out, pos, pieces, piece_at[mid], size_of[mid])
            pos = copy_bytes(out, pos, scores_json, score_start[i], score_len[i])
            pos = copy_bytes(out, pos, pieces, piece_at[tail[i]], size_of[tail[i]])
            pos = copy_bytes(out, pos, header_blocks, header_start[i], header_len[i])
    return out, b_part, b_at, b_size, b_count


def _template_pieces(emit_ns: int, model: str, version: str) -> tuple[np.ndarray, np.ndarray]:
    """The constant parts of stream.contracts.signal._TEMPLATE for this call, indexed by P_*."""
    dumps = orjson.dumps
    mid = b',"emit_ns":%d,"model":%b,"version":' % (emit_ns, dumps(model))
    pieces = (
        b'{"schema_version":"%b","symbol":"' % SCHEMA_VERSION.encode(),
        b'","trade_id":"',
        b'","event_ns":',
        b',"recv_ns":',
        b',"partition":',
        b',"offset":',
        mid + dumps(version) + b',"score":',
        mid + dumps("") + b',"score":',
        b',"direction":%d,"ready":true}' % UP,
        b',"direction":%d,"ready":true}' % DOWN,
        b',"direction":%d,"ready":false}' % FLAT,
        b',"direction":%d,"ready":true%b}' % (FLAT, ERROR_FIELD),
    )
    at = np.zeros(len(pieces) + 1, np.int64)
    np.cumsum([len(p) for p in pieces], out=at[1:])
    return np.frombuffer(b"".join(pieces) + PADDING, np.uint8), at


def _header_section(headers: Sequence[tuple[str, bytes | None]]) -> bytes:
    """A record's headers section: the count, then each key and value."""
    block = bytearray()
    encode_varint(len(headers), block.append)
    for key, value in headers:
        key_b = key.encode()
        encode_varint(len(key_b), block.append)
        block += key_b
        encode_varint(-1 if value is None else len(value), block.append)
        block += value or b""
    return bytes(block)


def _header_blocks(
    headers: Sequence[tuple[str, bytes | None]],
    row_headers: Mapping[int, Sequence[tuple[str, bytes | None]]] | None,
    n: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every row's headers section: one buffer, and per row where its section starts, its size.

    Rows share the section of `headers`; a row of `row_headers` has its own, its
    headers first. Padded for block copies (see `copy_bytes`).
    """
    common = _header_section(headers)
    start = np.zeros(n, np.int64)
    size = np.full(n, len(common), np.int64)
    sections = [common]
    at = len(common)
    for row, extra in (row_headers or {}).items():
        section = _header_section([*extra, *headers])
        start[row], size[row] = at, len(section)
        sections.append(section)
        at += len(section)
    return np.frombuffer(b"".join(sections) + PADDING, np.uint8), start, size


def encode_signal_batches(
    text: np.ndarray,
    *,
    sym_start: np.ndarray,
    sym_len: np.ndarray,
    key_start: np.ndarray,
    key_len: np.ndarray,
    tid_start: np.ndarray,
    tid_len: np.ndarray,
    event_ns: np.ndarray,
    recv_ns: np.ndarray,
    tick_partition: np.ndarray,
    tick_offset: np.ndarray,
    emit_ns: int,
    model: str,
    version: str,
    scores: np.ndarray,
    threshold: float,
    partition: np.ndarray,
    timestamp_ms: int,
    ready: np.ndarray | None = None,
    headers: Sequence[tuple[str, bytes | None]] = (),
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    stamp_last: Callable[[], int] | None = None,
    row_headers: Mapping[int, Sequence[tuple[str, bytes | None]]] | None = None,
) -> list[tuple[int, bytes, int]]:
    """Kafka record batches (magic 2, uncompressed) holding one signal per row.

    Each value is byte for byte what `stream.contracts.signal.encode_signals` writes for the
    row (a row not `ready` stands for a score of None; a ready row's NaN score for a
    model error). Rows go to their `partition`, in
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
        tick_partition: int64, the partition each row's tick was read from.
        tick_offset: int64, its offset there.
        emit_ns: When the micro-batch was scored (the same for every row).
        model: Model name.
        version: Model version (written for scored rows; "" for the others).
        scores: float64 P(up), NaN where the features were not ready or the model
            gave no finite score.
        threshold: UP at or above it, DOWN below.
        partition: int64 output partition per row.
        timestamp_ms: The records' timestamp (the same for every record).
        ready: bool per row, the features were complete; None: where `scores` is
            not NaN.
        headers: Headers of every record, such as the stage timing header.
        max_batch_bytes: A batch stays smaller than this (a record that alone does not
            still goes, alone).
        stamp_last: If given, called once the records are built (before their CRCs):
            its value, little-endian int64, replaces the last 8 bytes of every
            record's last header value (the "encoded" time of the stage header).
        row_headers: Headers of a few rows only, by row, written before `headers`
            (the `traceparent` of a traced tick's signal).

    Returns:
        (partition, batch bytes, record count) per batch, by partition, then row order.

    >>> from aiokafka.record.default_records import DefaultRecordBatch
    >>> from stream.contracts.signal import Signal
    >>> at = np.array([0]), np.array([3])  # "BTC" at 0, trade id "7" at 3
    >>> [(p, data, n)] = encode_signal_batches(
    ...     np.frombuffer(b"BTC7", np.uint8), sym_start=at[0], sym_len=at[1],
    ...     key_start=at[0], key_len=at[1], tid_start=at[1], tid_len=at[1] - 2,
    ...     event_ns=at[1], recv_ns=at[1], tick_partition=at[0], tick_offset=at[1],
    ...     emit_ns=9, model="m", version="4",
    ...     scores=np.array([0.75]), threshold=0.5, partition=np.array([2]), timestamp_ms=5)
    >>> [record] = DefaultRecordBatch(data)
    >>> signal = Signal.decode(record.value)
    >>> p, n, record.key, signal.symbol, signal.trade_id, signal.score, signal.direction
    (2, 1, b'BTC', 'BTC', '7', 0.75, 1)
    """
    n = len(partition)
    per_row = (
        sym_start,
        sym_len,
        key_start,
        key_len,
        tid_start,
        tid_len,
        event_ns,
        recv_ns,
        tick_partition,
        tick_offset,
        partition,
    )
    columns = [np.ascontiguousarray(c, np.int64) for c in per_row]
    scores = np.ascontiguousarray(scores, np.float64)
    ready = ~np.isnan(scores) if ready is None else np.ascontiguousarray(ready, np.bool_)
    if any(len(c) != n for c in columns) or len(scores) != n or len(ready) != n:
        raise ValueError("every per-row array must have one entry per row")
    if n == 0:
        return []
    # same text as orjson.dumps(scores.tolist()) (NaN -> null), without the list
    scores_text = orjson.dumps(scores, option=orjson.OPT_SERIALIZE_NUMPY)
    scores_json = np.frombuffer(scores_text + PADDING, np.uint8)
    padded_text = np.empty(len(text) + COPY_BLOCK, np.uint8)  # sources are padded: see copy_bytes
    padded_text[: len(text)] = text
    pieces, piece_at = _template_pieces(emit_ns, model, version)
    s_start, s_len, k_start, k_len, t_start, t_len, ev, rv, tick_p, tick_o, part = columns
    out, b_part, b_at, b_size, b_count = _encode(
        padded_text,
        s_start,
        s_len,
        k_start,
        k_len,
        t_start,
        t_len,
        ev,
        rv,
        tick_p,
        tick_o,
        ready,
        scores,
        float(threshold),
        scores_json,
        part,
        pieces,
        piece_at,
        int(timestamp_ms),
        *_header_blocks(headers, row_headers, n),
        int(max_batch_bytes),
    )
    if stamp_last is not None:
        if not headers or len(headers[-1][1] or b"") < 8:
            raise ValueError("stamp_last needs a last header value of at least 8 bytes")
        _stamp_tails(out, b_at, b_count, np.int64(stamp_last()))
    crc_batches(out, b_at, b_size)
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


def warm_up() -> None:
    """Load (or compile) the kernels now, so the first micro-batch does not pay for it."""
    one = np.ones(1, np.int64)
    encode_signal_batches(
        np.frombuffer(b"A", np.uint8),
        sym_start=one - 1,
        sym_len=one,
        key_start=one - 1,
        key_len=one,
        tid_start=one - 1,
        tid_len=one,
        event_ns=one,
        recv_ns=one,
        tick_partition=one,
        tick_offset=one,
        emit_ns=1,
        model="m",
        version="1",
        scores=np.full(1, 0.5),
        threshold=0.5,
        partition=one,
        timestamp_ms=1,
        headers=[("t", b"")],
    )


def record_batch(
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes | None]],
    timestamp_ms: int,
) -> bytes:
    """A v2 record batch of one record, uncompressed, for `stream.kafka.wire.WireProducer`.

    For the worker's records that are not signals (dead letters, micro-batch summaries,
    shadow scores): one Produce beside the signals' instead of a trip through
    aiokafka's producer, whose sender loop costs more CPU per record than the record.
    """
    record = bytearray(b"\x00")  # attributes
    encode_varint(0, record.append)  # timestampDelta
    encode_varint(0, record.append)  # offsetDelta
    for part in (key, value):
        encode_varint(-1 if part is None else len(part), record.append)
        record += part or b""
    record += _header_section(headers)
    length = bytearray()
    encode_varint(len(record), length.append)
    size = HEADER_SIZE + len(length) + len(record)
    out = np.zeros(size, np.uint8)
    pos = put_batch_header(out, 0, size, 1, timestamp_ms)
    out[pos:] = np.frombuffer(bytes(length + record), np.uint8)
    crc_batches(out, np.zeros(1, np.int64), np.full(1, size, np.int64))
    return out.tobytes()
