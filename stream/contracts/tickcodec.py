"""Columnar tick decoding: a micro-batch of record values -> number columns and string spans.

`decode_columns` gives what `stream.contracts.tick.decode_batch` gives (the same rows, values
bit for bit and rejections) without Python objects per record in the common case:
the Numba scan of `stream.contracts.tickscan` takes the records in the contract's canonical
shape and notes where their strings sit instead of building them. Every number is
converted with correct rounding: the scan's exact cases in the scan, the other tokens
at once by pyarrow (fast_float) or numpy (CPython's dtoa). A record off the fast path,
or failing a value check, takes `stream.contracts.tick.decode_tick`, which accepts what the
contract allows (an integer price, an escaped string) and names the dead-letter
reason for the rest.

`SymbolTable` maps rows to feature slots in Numba, by hash and then by bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import orjson
import pyarrow as pa

from stream.contracts.tick import Rejected, Tick, decode_tick
from stream.contracts.tickscan import (
    N_INT_ROWS,
    R_EVENT,
    R_INDEX,
    R_KEY_LEN,
    R_KEY_START,
    R_RECV,
    R_SYM_LEN,
    R_SYM_START,
    R_TID_LEN,
    R_TID_START,
    TOKEN_WIDTH,
    check,
    fnv1a,
    hash_spans,
    njit_no_nrt,
    scan,
    token_matrix,
)
from tickserve.errors import InvalidTick

ARROW_MIN = 48  # tokens from which pyarrow's cheaper tokens pay for its dearer call over numpy's
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True, slots=True)
class TickSpans:
    """A decoded micro-batch: number columns, and strings as spans of `text`.

    Row i came from record `index[i]`. `sym_start`/`sym_len` span the symbol's
    JSON-escaped content (the bytes between the quotes of `orjson.dumps(symbol)`),
    `key_start`/`key_len` its UTF-8 bytes (the same span for plain ASCII symbols),
    `tid_start`/`tid_len` the trade id's JSON-escaped content. `sym_hash` is FNV-1a 64
    of the symbol's span. `text` is the input buffer, with the strings of rows that
    took the slow path appended.
    """

    text: np.ndarray
    event_ns: np.ndarray
    price: np.ndarray
    quantity: np.ndarray
    is_buy: np.ndarray
    recv_ns: np.ndarray
    index: np.ndarray
    sym_start: np.ndarray
    sym_len: np.ndarray
    key_start: np.ndarray
    key_len: np.ndarray
    tid_start: np.ndarray
    tid_len: np.ndarray
    sym_hash: np.ndarray

    def __len__(self) -> int:
        return len(self.index)

    def take(self, rows: np.ndarray) -> TickSpans:
        """Only `rows` (indices, in order), sharing `text`."""
        return TickSpans(text=self.text, **{name: getattr(self, name)[rows] for name in _COLUMNS})

    def symbols(self, rows: np.ndarray | None = None) -> list[str]:
        """The symbols of all rows, or of `rows`, as strings (for taps, tests, dead letters)."""
        text = self.text.tobytes()
        starts, lens = _pick(self.key_start, self.key_len, rows)
        return [text[s : s + n].decode() for s, n in zip(starts, lens, strict=True)]

    def trade_ids(self, rows: np.ndarray | None = None) -> list[str]:
        """The trade ids of all rows, or of `rows`, as strings."""
        text = self.text.tobytes()
        starts, lens = _pick(self.tid_start, self.tid_len, rows)
        return [_unescape(text[s : s + n]) for s, n in zip(starts, lens, strict=True)]


_COLUMNS = tuple(name for name in TickSpans.__dataclass_fields__ if name != "text")


def _pick(
    starts: np.ndarray, lens: np.ndarray, rows: np.ndarray | None
) -> tuple[list[int], list[int]]:
    if rows is not None:
        starts, lens = starts[rows], lens[rows]
    return starts.tolist(), lens.tolist()


def _unescape(content: bytes) -> str:
    if b"\\" in content:
        return str(orjson.loads(b'"' + content + b'"'))
    return content.decode()


def pack(values: Sequence[bytes | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lay out record values for `decode_columns`: (buf, starts, lens), None as length -1.

    >>> buf, starts, lens = pack([b"ab", None, b"c"])
    >>> buf.tobytes(), starts.tolist(), lens.tolist()
    (b'abc', [0, 2, 2], [2, -1, 1])
    """
    try:
        lens = np.fromiter(map(len, values), np.int64, len(values))  # type: ignore[arg-type]
        joined = b"".join(values)  # type: ignore[arg-type]
        sizes = lens
    except TypeError:  # a None among them
        lens = np.array([-1 if v is None else len(v) for v in values], np.int64)
        joined = b"".join([v for v in values if v is not None])
        sizes = np.maximum(lens, 0)
    return np.frombuffer(joined, np.uint8), np.cumsum(sizes) - sizes, lens


def parse_tokens(fb: np.ndarray, fb_off: np.ndarray, count: int) -> np.ndarray:
    """Correctly rounded float64 of `count` JSON number tokens `fb[fb_off[t]:fb_off[t + 1]]`."""
    if count >= ARROW_MIN:
        return parse_tokens_arrow(fb, fb_off, count)
    return parse_tokens_numpy(fb, fb_off, count)


def parse_tokens_arrow(fb: np.ndarray, fb_off: np.ndarray, count: int) -> np.ndarray:
    """`parse_tokens` by pyarrow's string -> float64 cast (fast_float, correctly rounded)."""
    offsets = pa.py_buffer(fb_off[: count + 1].astype(np.int32))
    tokens = pa.Array.from_buffers(pa.binary(), count, [None, offsets, pa.py_buffer(fb)])
    try:
        floats = tokens.cast(pa.float64())
    except pa.ArrowInvalid:  # not seen for tokens in JSON grammar; numpy takes them all
        return parse_tokens_numpy(fb, fb_off, count)
    return np.frombuffer(floats.buffers()[1], np.float64, count)  # to_numpy imports pandas


def parse_tokens_numpy(fb: np.ndarray, fb_off: np.ndarray, count: int) -> np.ndarray:
    """`parse_tokens` by numpy's bytes -> float64 cast (CPython's dtoa, correctly rounded)."""
    mat = token_matrix(fb, fb_off, count)
    return np.asarray(mat.view(f"S{TOKEN_WIDTH}").ravel().astype(np.float64))


def decode_columns(
    buf: np.ndarray, starts: np.ndarray, lens: np.ndarray, now_ns: int, max_future_ns: int
) -> tuple[TickSpans, list[Rejected]]:
    """Decode a micro-batch laid out as by `pack`: what `decode_batch` gives, as spans.

    Args:
        buf: uint8, the record values one after another.
        starts: int64, where record i starts in `buf`.
        lens: int64, its length; -1 for a record without a value.
        now_ns: Current wall-clock time in ns.
        max_future_ns: Tolerated clock skew into the future.

    Returns:
        The accepted rows in record order, and the rejected records with their reasons.
        `TickSpans.text` is `buf` itself unless a row took the slow path.

    Raises:
        ValueError: A record lies outside `buf`.

    >>> spans, rejected = decode_columns(*pack([b'{"symbol":"A","event_ns":1,"price":2.5,'
    ...     b'"quantity":1.0,"side":"buy","trade_id":7,"recv_ns":3}', b"{"]), 10, 0)
    >>> spans.symbols(), spans.trade_ids(), spans.price.tolist(), [r.reason for r in rejected]
    (['A'], ['7'], [2.5], ['decode'])
    """
    if buf.flags.writeable:  # the kernels are compiled for pack's read-only buffer
        buf = buf.view()
        buf.flags.writeable = False
    starts = np.asarray(starts, np.int64)
    lens = np.asarray(lens, np.int64)
    n = len(starts)
    ints = np.empty((N_INT_ROWS, n), np.int64)
    hashes = np.empty(n, np.uint64)
    nums = np.empty((2, n), np.float64)
    is_buy = np.empty(n, np.bool_)
    fb = np.empty(2 * TOKEN_WIDTH * n, np.uint8)
    fb_off = np.empty(2 * n + 1, np.int64)
    fb_dst = np.empty(2 * n, np.int64)
    slow = np.empty(n, np.int64)
    rows, nfb, nslow = scan(buf, starts, lens, ints, hashes, nums, is_buy, fb, fb_off, fb_dst, slow)
    if rows < 0:
        raise ValueError(f"record {nfb} lies outside buf ({len(buf)} bytes)")
    if nfb:
        nums.ravel()[fb_dst[:nfb]] = parse_tokens(fb, fb_off, nfb)
    # the scan's integers lie within +-(2**63 - 1), so clamping keeps every comparison
    limit = min(max(now_ns + max_future_ns, INT64_MIN), INT64_MAX)
    rows, nslow = check(ints, hashes, nums, is_buy, rows, limit, slow, nslow)
    fast = _Rows(ints[:, :rows], hashes[:rows], nums[:, :rows], is_buy[:rows])
    if not nslow:
        return fast.spans(buf), []
    rejected: list[Rejected] = []
    accepted: list[tuple[int, Tick]] = []
    for i in np.sort(slow[:nslow]).tolist():
        raw = None if lens[i] < 0 else buf[starts[i] : starts[i] + lens[i]].tobytes()
        try:
            accepted.append((i, decode_tick(raw, now_ns, max_future_ns)))
        except InvalidTick as exc:
            rejected.append(Rejected(i, exc.reason, exc.detail))
    if not accepted:
        return fast.spans(buf), rejected
    text, extra = _slow_rows(buf, accepted)
    return fast.merge(extra).spans(text), rejected


@dataclass(frozen=True, slots=True)
class _Rows:
    """Rows as the scan lays them out: columns of `ints` (rows R_*) and `nums`."""

    ints: np.ndarray
    hashes: np.ndarray
    nums: np.ndarray
    is_buy: np.ndarray

    def merge(self, other: _Rows) -> _Rows:
        """Both sets of rows, in record order."""
        ints = np.concatenate((self.ints, other.ints), axis=1)
        order = np.argsort(ints[R_INDEX], kind="stable")
        return _Rows(  # take, unlike [:, order], keeps each row contiguous
            ints.take(order, axis=1),
            np.concatenate((self.hashes, other.hashes))[order],
            np.concatenate((self.nums, other.nums), axis=1).take(order, axis=1),
            np.concatenate((self.is_buy, other.is_buy))[order],
        )

    def spans(self, text: np.ndarray) -> TickSpans:
        ints = self.ints
        return TickSpans(
            text=text,
            event_ns=ints[R_EVENT],
            price=self.nums[0],
            quantity=self.nums[1],
            is_buy=self.is_buy,
            recv_ns=ints[R_RECV],
            index=ints[R_INDEX],
            sym_start=ints[R_SYM_START],
            sym_len=ints[R_SYM_LEN],
            key_start=ints[R_KEY_START],
            key_len=ints[R_KEY_LEN],
            tid_start=ints[R_TID_START],
            tid_len=ints[R_TID_LEN],
            sym_hash=self.hashes,
        )


def _slow_rows(buf: np.ndarray, accepted: list[tuple[int, Tick]]) -> tuple[np.ndarray, _Rows]:
    """Rows of the ticks `decode_tick` accepted, their strings appended to `buf`."""
    k = len(accepted)
    ints = np.empty((N_INT_ROWS, k), np.int64)
    nums = np.empty((2, k), np.float64)
    is_buy = np.empty(k, np.bool_)
    parts: list[bytes] = []
    size = len(buf)

    def append(content: bytes) -> int:
        nonlocal size
        parts.append(content)
        size += len(content)
        return size - len(content)

    for j, (i, tick) in enumerate(accepted):
        sym = orjson.dumps(tick.symbol)[1:-1]
        key = tick.symbol.encode()
        tid = orjson.dumps(tick.trade_id)[1:-1]
        ints[R_SYM_START, j] = append(sym)
        ints[R_SYM_LEN, j] = len(sym)
        ints[R_KEY_START, j] = ints[R_SYM_START, j] if key == sym else append(key)
        ints[R_KEY_LEN, j] = len(key)
        ints[R_TID_START, j] = append(tid)
        ints[R_TID_LEN, j] = len(tid)
        ints[R_INDEX, j] = i
        # an int beyond int64 raises OverflowError here, as in decode_batch
        ints[R_EVENT, j] = tick.event_ns
        ints[R_RECV, j] = tick.recv_ns
        nums[0, j] = tick.price
        nums[1, j] = tick.quantity
        is_buy[j] = tick.side == "buy"
    text = np.concatenate((buf, np.frombuffer(b"".join(parts), np.uint8)))
    text.flags.writeable = False  # as buf: one Numba specialization of the lookup for both
    hashes = np.empty(k, np.uint64)
    hash_spans(text, ints[R_SYM_START], ints[R_SYM_LEN], hashes)
    return text, _Rows(ints, hashes, nums, is_buy)


def symbol_hash(content: bytes) -> int:
    """FNV-1a 64 of a symbol's JSON-escaped content, as in `TickSpans.sym_hash`.

    >>> hex(symbol_hash(b"a"))
    '0xaf63dc4c8601ec8c'
    """
    data = np.frombuffer(content, np.uint8)
    return int(fnv1a(data, 0, len(data)))


class SymbolTable:
    """Symbol -> feature slot for decoded rows, looked up in Numba without string objects.

    Keys are a symbol's JSON-escaped content, as `TickSpans.sym_start`/`sym_len` span
    it. Open addressing with linear probing over `sym_hash`; a row matches an entry
    only if its bytes equal the entry's, so a hash collision cannot route a tick to
    another symbol's slot.
    """

    def __init__(self, capacity: int = 256) -> None:
        size = 16
        while size < 2 * capacity:
            size *= 2
        self._hashes = np.zeros(size, np.uint64)
        self._slots = np.full(size, -1, np.int64)
        self._key_start = np.zeros(size, np.int64)
        self._key_len = np.zeros(size, np.int64)
        self._pool = np.empty(16 * size, np.uint8)  # the keys' bytes
        self._pool_used = 0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, symbol_json_content: bytes, slot: int) -> None:
        """Map a symbol, given as its JSON-escaped content, to `slot` (>= 0)."""
        self._insert(symbol_hash(symbol_json_content), symbol_json_content, slot)

    def lookup(self, spans: TickSpans) -> np.ndarray:
        """The slot of each row's symbol; -1 where the table does not hold it."""
        out = np.empty(len(spans), np.int64)
        _lookup(
            spans.text,
            spans.sym_start,
            spans.sym_len,
            spans.sym_hash,
            self._hashes,
            self._slots,
            self._key_start,
            self._key_len,
            self._pool,
            out,
        )
        return out

    def _insert(self, h: int, content: bytes, slot: int) -> None:
        """Store `content` under hash `h` (`add` hashes; tests force collisions here)."""
        if slot < 0:
            raise ValueError(f"a slot is >= 0, got {slot}")
        if 2 * (self._count + 1) > len(self._slots):
            self._grow()
        data = np.frombuffer(content, np.uint8)
        end = self._pool_used + len(data)
        if end > len(self._pool):
            self._pool = np.concatenate((self._pool, np.empty(max(end, len(self._pool)), np.uint8)))
        self._pool[self._pool_used : end] = data
        added = _insert(
            self._hashes,
            self._slots,
            self._key_start,
            self._key_len,
            self._pool,
            np.uint64(h),
            self._pool_used,
            len(data),
            slot,
        )
        if added:
            self._pool_used = end
            self._count += 1

    def _grow(self) -> None:
        hashes, slots = self._hashes, self._slots
        starts, lens = self._key_start, self._key_len
        size = 2 * len(slots)
        self._hashes = np.zeros(size, np.uint64)
        self._slots = np.full(size, -1, np.int64)
        self._key_start = np.zeros(size, np.int64)
        self._key_len = np.zeros(size, np.int64)
        for i in np.flatnonzero(slots >= 0).tolist():
            _insert(
                self._hashes,
                self._slots,
                self._key_start,
                self._key_len,
                self._pool,
                hashes[i],
                starts[i],
                lens[i],
                slots[i],
            )


@njit_no_nrt()
def _same(a: np.ndarray, a_start: int, b: np.ndarray, b_start: int, size: int) -> bool:
    j = 0
    while j < size and a[a_start + j] == b[b_start + j]:
        j += 1
    return j == size


@njit_no_nrt()
def _insert(
    hashes: np.ndarray,
    slots: np.ndarray,
    key_start: np.ndarray,
    key_len: np.ndarray,
    pool: np.ndarray,
    h: np.uint64,
    start: int,
    size: int,
    slot: int,
) -> bool:
    """Map the key pool[start:start + size] under hash h to slot; False if it was there."""
    mask = slots.shape[0] - 1
    i = np.int64(h & np.uint64(mask))
    while slots[i] >= 0:
        if hashes[i] == h and key_len[i] == size and _same(pool, key_start[i], pool, start, size):
            slots[i] = slot
            return False
        i = (i + 1) & mask
    hashes[i] = h
    slots[i] = slot
    key_start[i] = start
    key_len[i] = size
    return True


@njit_no_nrt()
def _lookup(
    text: np.ndarray,
    starts: np.ndarray,
    lens: np.ndarray,
    row_hashes: np.ndarray,
    hashes: np.ndarray,
    slots: np.ndarray,
    key_start: np.ndarray,
    key_len: np.ndarray,
    pool: np.ndarray,
    out: np.ndarray,
) -> None:
    mask = slots.shape[0] - 1
    for r in range(starts.shape[0]):
        h = row_hashes[r]
        size = lens[r]
        i = np.int64(h & np.uint64(mask))
        out[r] = -1
        while slots[i] >= 0:
            if (
                hashes[i] == h
                and key_len[i] == size
                and _same(text, starts[r], pool, key_start[i], size)
            ):
                out[r] = slots[i]
                break
            i = (i + 1) & mask


def warm_up() -> None:
    """Compile, or load from Numba's cache, every kernel here, with a tiny batch."""
    good = Tick("A", 1, 2.5, 1.0, "buy", "7", 1)
    values = [
        good.encode(),
        Tick("A", 1, 0.1 + 0.2, 1.0, "sell", "8", 1).encode(),  # a token for the parser
        b' {"trade_id": 9, ' + good.encode()[1:].replace(b',"trade_id":"7"', b""),
        orjson.dumps({**orjson.loads(good.encode()), "symbol": "\u00e9", "price": 3}),  # slow
        None,
    ]
    spans, _ = decode_columns(*pack(values), 10, 0)
    table = SymbolTable(1)
    for content in (b"A", b"B", b"C"):  # and a grown table
        table.add(content, len(table))
    table.lookup(spans)
    fb = np.frombuffer(b"0.3", np.uint8)
    parse_tokens_arrow(fb, np.array([0, 3], np.int64), 1)
    parse_tokens_numpy(fb, np.array([0, 3], np.int64), 1)
