"""Numba kernels of the columnar tick decoder (`stream.contracts.tickcodec`): scan, check.

`scan` reads each record of a micro-batch once. A record on the fast path is one JSON
object holding exactly the seven fields of the tick contract, once each, with plain
printable-ASCII strings (no escapes), integers within int64 and numbers in JSON
grammar. It is tried first in `Tick.encode`'s exact layout, then as any such object
(keys in any order, JSON whitespace). Everything else is left to `decode_tick`.

Numbers: a price or quantity in Clinger's exact case (decimal mantissa w <= 2**53,
10**|e| with |e| <= 22: both exact doubles, so one IEEE multiplication or division
rounds the true value correctly) is converted here; any other token is copied out for
a library parser.

The kernels run without Numba's reference counting (`njit_no_nrt`; they allocate
nothing): with it, each call taking an array kept an atomic incref/decref pair
wherever its control flow forked (4x slower). They read bytes through `_at`, whose
unsigned index spares the negative-index wraparound (1.4x faster); so every position
read must lie in [0, len(buf)), and `scan` checks each record's bounds first.
`_record` and `_value` are inlined by Numba (calls passing many arrays cost 20% of
the scan); the small helpers are left to LLVM, as Numba's inlining is slow to compile.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import numpy as np
from numba import njit

from tickserve.limits import MAX_SYMBOL_LEN

F = TypeVar("F", bound=Callable[..., Any])

TOKEN_WIDTH = 32  # longest price/quantity token the scan takes (longer: slow path)

# rows of the int64 matrix the scan fills (one column per row of the batch)
R_EVENT, R_RECV, R_INDEX = 0, 1, 2
R_SYM_START, R_SYM_LEN, R_KEY_START, R_KEY_LEN, R_TID_START, R_TID_LEN = 3, 4, 5, 6, 7, 8
N_INT_ROWS = 9

# the words the scan compares: keys (ids 0..6 are the field ids), sides, and the
# pieces of the canonical layout (`Tick.encode`: keys in field order, no whitespace)
_WORDS = (
    b"symbol",
    b"event_ns",
    b"price",
    b"quantity",
    b"side",
    b"trade_id",
    b"recv_ns",
    b"buy",
    b"sell",
    b'{"symbol":',
    b',"event_ns":',
    b',"price":',
    b',"quantity":',
    b',"side":',
    b',"trade_id":',
    b',"recv_ns":',
)
K_SYMBOL, K_EVENT, K_PRICE, K_QUANTITY, K_SIDE, K_TRADE_ID, K_RECV = 0, 1, 2, 3, 4, 5, 6
N_KEYS = 7
ALL_KEYS = (1 << N_KEYS) - 1
W_BUY, W_SELL, W_LAYOUT = 7, 8, 9  # W_LAYOUT + k: what precedes field k's value
WORD_BYTES = np.frombuffer(b"".join(_WORDS), np.uint8)
WORD_START = np.cumsum([0] + [len(k) for k in _WORDS[:-1]]).astype(np.int64)
WORD_LEN = np.array([len(k) for k in _WORDS], np.int64)

FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)
EXACT_MANTISSA = 2**53  # integers up to here are exact doubles
POW10 = np.array([float(10**k) for k in range(23)])  # exact doubles (5**22 < 2**53)
INT_POW10 = np.array([10**k for k in range(19)], np.int64)
INT64_MAX = 2**63 - 1

QUOTE, BACKSLASH, COMMA, COLON, MINUS, PLUS, DOT = 34, 92, 44, 58, 45, 43, 46
OPEN, CLOSE, ZERO, NINE = 123, 125, 48, 57


def njit_no_nrt(inline: Literal["never", "always"] = "never") -> Callable[[F], F]:
    """`@njit(cache=True)` without Numba's reference counting, for kernels allocating nothing."""
    return njit(cache=True, _nrt=False, inline=inline)  # type: ignore[call-overload, no-any-return]


@njit_no_nrt()
def _at(buf: np.ndarray, pos: int) -> int:
    return buf[np.uint64(pos)]  # type: ignore[no-any-return]


@njit_no_nrt()
def _peek(buf: np.ndarray, pos: int, end: int) -> int:
    """The byte at pos, or -1 at the end of the record."""
    return _at(buf, pos) if pos < end else -1


@njit_no_nrt()
def _skip_ws(buf: np.ndarray, pos: int, end: int) -> int:
    while pos < end:
        c = _at(buf, pos)
        if c != 32 and c != 10 and c != 13 and c != 9:
            break
        pos += 1
    return pos


@njit_no_nrt()
def _string_end(buf: np.ndarray, pos: int, end: int) -> int:
    """Position of the closing quote of a plain string starting at pos, or -1.

    Plain: printable ASCII without backslash; anything else is left to orjson.
    """
    for j in range(pos, end):
        c = _at(buf, j)
        if c == QUOTE:
            return j
        if c < 32 or c > 126 or c == BACKSLASH:
            return -1
    return -1


@njit_no_nrt()
def _literal(buf: np.ndarray, pos: int, end: int, word: int) -> int:
    """The position after `_WORDS[word]` if it sits at pos, else -1."""
    size = WORD_LEN[word]
    if end - pos < size:
        return -1
    base = WORD_START[word]
    diff = 0
    for j in range(size):  # no early exit: a short loop LLVM can unroll
        diff |= _at(buf, pos + j) ^ _at(WORD_BYTES, base + j)
    return pos + size if diff == 0 else -1


@njit_no_nrt()
def _digits_end(buf: np.ndarray, pos: int, end: int) -> int:
    for j in range(pos, end):
        c = _at(buf, j)
        if c < ZERO or c > NINE:
            return j
    return end


@njit_no_nrt()
def _digits_value(buf: np.ndarray, start: int, stop: int) -> int:
    """The value of at most 18 decimal digits, two at a time (half the multiply chain)."""
    value = 0
    j = start
    if (stop - start) & 1:
        value = _at(buf, j) - ZERO
        j += 1
    while j < stop:
        value = value * 100 + (_at(buf, j) - ZERO) * 10 + (_at(buf, j + 1) - ZERO)
        j += 2
    return value


@njit_no_nrt()
def _integer(buf: np.ndarray, pos: int, end: int, signed: bool) -> tuple[int, int]:
    """A JSON integer within +-(2**63 - 1) at pos: (value, end), end -1 if not.

    Beyond int64, orjson gives a Python int that decode_batch cannot store either.
    """
    first = pos + 1 if signed and _peek(buf, pos, end) == MINUS else pos
    last = _digits_end(buf, first, end)
    size = last - first
    if size == 0 or size > 19 or (size > 1 and _at(buf, first) == ZERO):
        return 0, -1
    value = _digits_value(buf, first, min(last, first + 18))
    if size == 19:
        digit = _at(buf, first + 18) - ZERO
        if value > INT64_MAX // 10 or digit > INT64_MAX - value * 10:
            return 0, -1
        value = value * 10 + digit
    return (-value if first > pos else value), last


@njit_no_nrt()
def _number(buf: np.ndarray, pos: int, end: int) -> tuple[float, bool, int]:
    """A JSON number with a fraction or exponent at pos: (value, exact, end), end -1 if not.

    `exact`: the value is Clinger's exact case, computed here; else the caller has the
    token converted by a library.
    """
    neg = _peek(buf, pos, end) == MINUS
    first = pos + 1 if neg else pos
    int_end = _digits_end(buf, first, end)
    if int_end == first or (int_end - first > 1 and _at(buf, first) == ZERO):
        return 0.0, False, -1
    j = int_end
    frac_digits = 0
    if _peek(buf, j, end) == DOT:
        j = _digits_end(buf, int_end + 1, end)
        frac_digits = j - int_end - 1
        if frac_digits == 0:
            return 0.0, False, -1
    scale = -frac_digits
    c = _peek(buf, j, end)
    if c == 101 or c == 69:  # e, E
        sign = _peek(buf, j + 1, end)
        exp_first = j + 2 if sign in (MINUS, PLUS) else j + 1
        j = _digits_end(buf, exp_first, end)
        if j == exp_first:
            return 0.0, False, -1
        if j - exp_first > 3:  # e.g. 1e0000001: left to the library
            return 0.0, False, j
        exponent = _digits_value(buf, exp_first, j)
        scale += -exponent if sign == MINUS else exponent
    elif frac_digits == 0:  # a JSON integer: orjson gives an int, which decode_tick converts
        return 0.0, False, -1
    if (int_end - first) + frac_digits > 18 or scale < -22 or scale > 22:
        return 0.0, False, j
    mantissa = _digits_value(buf, first, int_end) * INT_POW10[frac_digits]
    mantissa += _digits_value(buf, int_end + 1, int_end + 1 + frac_digits)
    if mantissa > EXACT_MANTISSA:
        return 0.0, False, j
    value = float(mantissa)
    value = value * POW10[scale] if scale >= 0 else value / POW10[-scale]
    return (-value if neg else value), True, j


@njit_no_nrt()
def fnv1a(buf: np.ndarray, start: int, end: int) -> np.uint64:
    """FNV-1a 64 of buf[start:end]."""
    h = FNV_OFFSET
    for j in range(start, end):
        h = (h ^ np.uint64(_at(buf, j))) * FNV_PRIME
    return h


@njit_no_nrt("always")
def _value(buf: np.ndarray, pos: int, end: int, key: int) -> tuple[int, int, int, float]:
    """The value of field `key` at pos: (end, a, b, number), end -1 if not on the fast path.

    Numbers: a = 1 if `number` is exact, else the token is buf[pos:end]. Integers: a.
    Symbol, trade id: the span (a, b) of the content. Side: a = 1 for buy.
    """
    if key in (K_PRICE, K_QUANTITY):
        number, exact, last = _number(buf, pos, end)
        return last, 1 if exact else 0, 0, number
    if key in (K_EVENT, K_RECV):
        integer, last = _integer(buf, pos, end, True)
        return last, integer, 0, 0.0
    if _peek(buf, pos, end) != QUOTE:
        if key != K_TRADE_ID:
            return -1, 0, 0, 0.0
        last = _integer(buf, pos, end, False)[1]  # an integer id stands for its digits
        return last, pos, last - pos, 0.0
    first = pos + 1
    last = _string_end(buf, first, end)
    size = last - first
    if last < 0 or (key == K_SYMBOL and size == 0):
        return -1, 0, 0, 0.0
    if key in (K_SYMBOL, K_TRADE_ID):
        return last + 1, first, size, 0.0
    if size == 3 and _literal(buf, first, last, W_BUY) == last:
        return last + 1, 1, 0, 0.0
    if size == 4 and _literal(buf, first, last, W_SELL) == last:
        return last + 1, 0, 0, 0.0
    return -1, 0, 0, 0.0


@njit_no_nrt()
def _key(buf: np.ndarray, pos: int, end: int) -> tuple[int, int]:
    """A plain key and its colon at pos (after whitespace): (field id, value position)."""
    pos = _skip_ws(buf, pos, end)
    if _peek(buf, pos, end) != QUOTE:
        return -1, pos
    last = _string_end(buf, pos + 1, end)
    if last < 0:
        return -1, pos
    for k in range(N_KEYS):
        if WORD_LEN[k] == last - pos - 1 and _literal(buf, pos + 1, last, k) == last:
            value = _skip_ws(buf, last + 1, end)
            if _peek(buf, value, end) != COLON:
                return -1, pos
            return k, _skip_ws(buf, value + 1, end)
    return -1, pos


@njit_no_nrt("always")
def _record(
    buf: np.ndarray,
    start: int,
    end: int,
    r: int,
    ints: np.ndarray,
    hashes: np.ndarray,
    nums: np.ndarray,
    is_buy: np.ndarray,
    fb: np.ndarray,
    fb_off: np.ndarray,
    fb_dst: np.ndarray,
    nfb: int,
) -> int:
    """Scan one record into row r: the new count of fallback tokens, or -1 if not fast.

    First as `Tick.encode` lays it out; at the first difference in layout, over again
    as any JSON object. A value off the fast path ends the scan in either mode.
    """
    first_nfb = nfb
    canonical = True
    field = 0  # in the canonical layout, the field now due
    pos = start
    seen = 0
    closed = False
    while not closed:
        if canonical:
            key = field
            value = _literal(buf, pos, end, W_LAYOUT + key) if key < N_KEYS else -1
        else:
            key, value = _key(buf, pos, end)
            if key < 0 or seen & (1 << key):
                return -1
        if value < 0:  # not the canonical layout: start over
            canonical = False
            seen = 0
            nfb = first_nfb
            pos = _skip_ws(buf, start, end)
            if _peek(buf, pos, end) != OPEN:
                return -1
            pos += 1
            continue
        seen |= 1 << key
        last, a, b, number = _value(buf, value, end, key)
        if last < 0:
            return -1
        if key in (K_PRICE, K_QUANTITY):
            row = 0 if key == K_PRICE else 1
            if a:
                nums[row, r] = number
            else:
                size = last - value
                if size > TOKEN_WIDTH:
                    return -1
                at = fb_off[nfb]
                for j in range(size):
                    fb[at + j] = _at(buf, value + j)
                fb_off[nfb + 1] = at + size
                fb_dst[nfb] = row * ints.shape[1] + r
                nfb += 1
        elif key == K_EVENT:
            ints[R_EVENT, r] = a
        elif key == K_RECV:
            ints[R_RECV, r] = a
        elif key == K_SYMBOL:
            ints[R_SYM_START, r] = a
            ints[R_SYM_LEN, r] = b
            ints[R_KEY_START, r] = a
            ints[R_KEY_LEN, r] = b
            hashes[r] = fnv1a(buf, a, a + b)
        elif key == K_TRADE_ID:
            ints[R_TID_START, r] = a
            ints[R_TID_LEN, r] = b
        else:
            is_buy[r] = a == 1
        if canonical:
            pos = last
            field += 1
            closed = field == N_KEYS and last == end - 1 and _at(buf, last) == CLOSE
            continue
        pos = _skip_ws(buf, last, end)
        c = _peek(buf, pos, end)
        if c != CLOSE and c != COMMA:
            return -1
        closed = c == CLOSE
        pos += 1
    if not canonical and (seen != ALL_KEYS or _skip_ws(buf, pos, end) != end):
        return -1
    return nfb


@njit_no_nrt()
def scan(
    buf: np.ndarray,
    starts: np.ndarray,
    lens: np.ndarray,
    ints: np.ndarray,
    hashes: np.ndarray,
    nums: np.ndarray,
    is_buy: np.ndarray,
    fb: np.ndarray,
    fb_off: np.ndarray,
    fb_dst: np.ndarray,
    slow: np.ndarray,
) -> tuple[int, int, int]:
    """Scan every record: a row for each one on the fast path, the others' indices in `slow`.

    Row r fills column r of `ints` (rows R_*), `nums` (price, quantity), `hashes`
    (FNV-1a 64 of the symbol) and `is_buy`. A number the scan did not convert is
    copied to `fb[fb_off[t]:fb_off[t + 1]]`, its value due at `nums.ravel()[fb_dst[t]]`.

    Returns:
        (rows, fallback tokens, slow records), or (-1, i, 0) if record i lies outside buf.
    """
    rows = 0
    nfb = 0
    nslow = 0
    fb_off[0] = 0
    for i in range(starts.shape[0]):
        got = -1
        if lens[i] >= 0:
            start = starts[i]
            end = start + lens[i]
            if start < 0 or end > buf.shape[0]:
                return -1, i, 0
            got = _record(
                buf, start, end, rows, ints, hashes, nums, is_buy, fb, fb_off, fb_dst, nfb
            )
        if got < 0:
            slow[nslow] = i
            nslow += 1
        else:
            ints[R_INDEX, rows] = i
            nfb = got
            rows += 1
    return rows, nfb, nslow


@njit_no_nrt()
def check(
    ints: np.ndarray,
    hashes: np.ndarray,
    nums: np.ndarray,
    is_buy: np.ndarray,
    rows: int,
    limit: int,
    slow: np.ndarray,
    nslow: int,
) -> tuple[int, int]:
    """Keep the rows passing the contract's value checks (compacted in place).

    Price finite and > 0, quantity finite and >= 0, event_ns <= limit, symbol of at
    most MAX_SYMBOL_LEN UTF-8 bytes (a longer one may still have few enough
    characters: the per-record path decides); a row failing one goes back to `slow`
    (after `nslow` entries) for `decode_tick` to name the reason.

    Returns:
        (rows kept, slow records).
    """
    kept = 0
    for r in range(rows):
        price = nums[0, r]
        qty = nums[1, r]
        if (
            0.0 < price < math.inf
            and 0.0 <= qty < math.inf
            and ints[R_EVENT, r] <= limit
            and ints[R_KEY_LEN, r] <= MAX_SYMBOL_LEN
        ):
            if kept != r:
                for f in range(ints.shape[0]):
                    ints[f, kept] = ints[f, r]
                nums[0, kept] = price
                nums[1, kept] = qty
                hashes[kept] = hashes[r]
                is_buy[kept] = is_buy[r]
            kept += 1
        else:
            slow[nslow] = ints[R_INDEX, r]
            nslow += 1
    return kept, nslow


@njit(cache=True)
def token_matrix(fb: np.ndarray, fb_off: np.ndarray, count: int) -> np.ndarray:
    """The first `count` fallback tokens as rows of TOKEN_WIDTH bytes, zero-padded."""
    mat = np.zeros((count, TOKEN_WIDTH), np.uint8)
    for t in range(count):
        at = fb_off[t]
        for j in range(fb_off[t + 1] - at):
            mat[t, j] = fb[at + j]
    return mat


@njit_no_nrt()
def hash_spans(text: np.ndarray, starts: np.ndarray, lens: np.ndarray, out: np.ndarray) -> None:
    """FNV-1a 64 of each span text[starts[i]:starts[i] + lens[i]], into out."""
    for i in range(starts.shape[0]):
        out[i] = fnv1a(text, starts[i], starts[i] + lens[i])
