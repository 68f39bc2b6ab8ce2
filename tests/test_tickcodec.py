"""Columnar tick decoding: exactly decode_batch's result, floats bit for bit, symbol slots."""

from __future__ import annotations

import math
import struct
import warnings
from collections.abc import Callable

import numpy as np
import orjson
import pytest

from stream.contracts.tick import Tick, TickColumns, decode_batch
from stream.contracts.tickcodec import (
    ARROW_MIN,
    SymbolTable,
    TickSpans,
    decode_columns,
    pack,
    parse_tokens,
    parse_tokens_arrow,
    parse_tokens_numpy,
    symbol_hash,
    warm_up,
)
from tests.helpers import GOOD, NOW
from tickserve.limits import MAX_SYMBOL_LEN

FUTURE_NS = 5_000_000_000
SYMBOLS = [
    "BTC/USDT", "ETH-USD", "A", "x" * 40, "é/€", 'we"ird', "back\\slash", "tab\tsym",
    "\u2028", "😀", "sp ace", "\x7f", "ctrl\x01", "",
] + [f"SYN{i:03d}/USD" for i in range(60)]  # fmt: skip
WHITESPACE = [b"", b"", b"", b" ", b"\n", b"\t", b"\r\n  "]
TRICKY_FLOATS = [
    "9007199254740993", "9007199254740993.0", "1e23", "8.98846567431158e307",
    "2.2250738585072011e-308", "2.2250738585072012e-308", "2.2250738585072014e-308",
    "4.9e-324", "2.4703282292062327e-324", "2.4703282292062328e-324", "5e-324",
    "1.7976931348623157e308", "1.7976931348623158e308", "1.7976931348623159e308",
    "0.1", "0.2", "0.3", "60000.01", "0.00141342", "1.5", "-0.0", "0.0", "1e400",
    "1e-400", "123456789012345678901234567890", "3.141592653589793238462643383279",
    "0.30000000000000004", "9007199254740992e1", "1e22", "1e-22", "123456789e-22",
    "4503599627370497.5", "1E5", "1e+5", "1e0000001", "7.2057594037927933e16",
    "1.00000000000000011102230246251565404236316680908203125", "-0", "-0e0", "0e0",
]  # fmt: skip


def fnv1a_reference(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) % 2**64
    return h


def bits(a: np.ndarray) -> list[int]:
    words: list[int] = np.ascontiguousarray(a, np.float64).view(np.uint64).tolist()
    return words


def assert_same(values: list[bytes | None], now_ns: int = NOW) -> TickSpans:
    """decode_columns gives decode_batch's rows, values (bit for bit) and rejections."""
    cols, rejected = decode_batch(values, now_ns, FUTURE_NS)
    spans, got_rejected = decode_columns(*pack(values), now_ns, FUTURE_NS)
    assert got_rejected == rejected
    assert spans.index.tolist() == cols.index.tolist()
    assert spans.symbols() == cols.symbols
    assert spans.trade_ids() == cols.trade_ids
    assert spans.event_ns.tolist() == cols.event_ns.tolist()
    assert spans.recv_ns.tolist() == cols.recv_ns.tolist()
    assert bits(spans.price) == bits(cols.price)
    assert bits(spans.quantity) == bits(cols.quantity)
    assert spans.is_buy.tolist() == cols.is_buy.tolist()
    assert_spans(spans, cols)
    return spans


def assert_spans(spans: TickSpans, cols: TickColumns) -> None:
    """The span columns hold what their docs say, with numpy dtypes the kernels expect."""
    text = spans.text.tobytes()
    for name in ("event_ns", "recv_ns", "index", "sym_start", "sym_len", "tid_start"):
        assert getattr(spans, name).dtype == np.int64
    assert [spans.price.dtype, spans.is_buy.dtype, spans.sym_hash.dtype] == [
        np.dtype(np.float64), np.dtype(np.bool_), np.dtype(np.uint64),
    ]  # fmt: skip
    assert len(spans) == len(cols)
    for r, (symbol, trade_id) in enumerate(zip(cols.symbols, cols.trade_ids, strict=True)):
        s, n = int(spans.sym_start[r]), int(spans.sym_len[r])
        assert text[s : s + n] == orjson.dumps(symbol)[1:-1]
        assert int(spans.sym_hash[r]) == fnv1a_reference(text[s : s + n])
        s, n = int(spans.key_start[r]), int(spans.key_len[r])
        assert text[s : s + n] == symbol.encode()
        s, n = int(spans.tid_start[r]), int(spans.tid_len[r])
        assert text[s : s + n] == orjson.dumps(trade_id)[1:-1]


def pick(rng: np.random.Generator, options: list[bytes]) -> bytes:
    return options[int(rng.integers(len(options)))]


def random_double(rng: np.random.Generator) -> float:
    return float(rng.integers(0, 2**64, dtype=np.uint64, endpoint=False).view(np.float64))


def number_token(rng: np.random.Generator) -> bytes:
    """A price or quantity as a feed might spell it, valid JSON or not."""
    kind = rng.integers(0, 10)
    if kind == 0:
        return orjson.dumps(random_double(rng))  # any bit pattern: nan -> null, negatives
    if kind == 1:
        return str(int(rng.integers(-5, 10**6))).encode()  # an integer price
    if kind == 2:
        return TRICKY_FLOATS[rng.integers(len(TRICKY_FLOATS))].encode()
    if kind == 3:
        mantissa, exponent = int(rng.integers(0, 10**15)), int(rng.integers(-30, 30))
        return f"{mantissa}e{exponent}".encode() if rng.random() < 0.5 else f"{mantissa}.5".encode()
    value = float(np.exp(rng.normal(3, 4)))
    if kind == 4:
        return f"{value:.{rng.integers(0, 20)}e}".encode()
    if kind == 5:
        return f"{value:.{rng.integers(1, 12)}f}".encode()
    return orjson.dumps(round(value, int(rng.integers(0, 9))))


def random_fields(rng: np.random.Generator, i: int) -> list[tuple[str, bytes]]:
    symbol = SYMBOLS[rng.integers(len(SYMBOLS))]
    sym_token = orjson.dumps(symbol)
    if symbol == "BTC/USDT" and rng.random() < 0.5:  # escapes orjson never writes
        sym_token = pick(rng, [b'"BTC\\/USDT"', b'"\\u0042TC/USDT"'])
    trade_id = pick(rng, [orjson.dumps(str(i)), str(i).encode(), b'""', orjson.dumps(f"t-{i}é"),
                          b"-7", b"007", orjson.dumps(2**63 + i)])  # fmt: skip
    event = NOW - int(rng.integers(-10 * FUTURE_NS, 10**12))
    fields = [
        ("symbol", sym_token),
        ("event_ns", str(event).encode() if rng.random() < 0.97 else b"1.5e18"),
        ("price", number_token(rng)),
        ("quantity", number_token(rng)),
        ("side", pick(rng, [b'"buy"', b'"sell"', b'"sell"', b'"BUY"', b"true"])),
        ("trade_id", trade_id if rng.random() < 0.3 else orjson.dumps(str(i))),
        ("recv_ns", str(NOW + i).encode()),
    ]
    if rng.random() < 0.03:
        fields.append(("extra", b"[1, 2]"))
    if rng.random() < 0.03:
        fields.append(fields[int(rng.integers(len(fields)))])  # a duplicate key
    if rng.random() < 0.02:
        fields.pop(int(rng.integers(len(fields))))
    return fields


def render(fields: list[tuple[str, bytes]], rng: np.random.Generator, shuffle: bool) -> bytes:
    def ws() -> bytes:
        return WHITESPACE[rng.integers(len(WHITESPACE))] if shuffle else b""

    order = rng.permutation(len(fields)) if shuffle else range(len(fields))
    items = [ws() + orjson.dumps(fields[k][0]) + ws() + b":" + ws() + fields[k][1] + ws()
             for k in order]  # fmt: skip
    return ws() + b"{" + b",".join(items) + b"}" + ws()


def random_records(seed: int, n: int) -> list[bytes | None]:
    rng = np.random.default_rng(seed)
    return [render(random_fields(rng, i), rng, shuffle=rng.random() < 0.5) for i in range(n)]


def encoded_ticks(seed: int, n: int) -> list[bytes | None]:
    rng = np.random.default_rng(seed)
    return [
        Tick(f"SYN{i % 100:03d}/USD", NOW - i, float(100 + rng.normal()), float(rng.exponential()),
             "buy" if rng.random() < 0.5 else "sell", str(i), NOW + i).encode()
        for i in range(n)
    ]  # fmt: skip


def out_of_int64(raw: bytes | None) -> bool:
    """A JSON object whose event_ns or recv_ns is an integer beyond int64."""
    try:
        doc = orjson.loads(raw)  # type: ignore[arg-type]
    except orjson.JSONDecodeError:
        return False
    return isinstance(doc, dict) and any(
        type(doc.get(k)) is int and not -(2**63) <= doc[k] < 2**63 for k in ("event_ns", "recv_ns")
    )


def mutate(raw: bytes, rng: np.random.Generator) -> bytes:
    pos = int(rng.integers(len(raw) + 1))
    kind = rng.integers(4)
    if kind == 0:
        return raw[:pos]
    if kind == 1 and pos < len(raw):
        return raw[:pos] + bytes([raw[pos] ^ int(rng.integers(1, 256))]) + raw[pos + 1 :]
    if kind == 2:
        insert = pick(rng, [bytes([c]) for c in b'"\\{}[],: 09e.-+\x00\x0b\x0c\x80\xc3\xff'])
        return raw[:pos] + insert + raw[pos:]
    return raw[:pos] + raw[pos + 1 :]


def test_the_encoders_output() -> None:
    values = encoded_ticks(1, 2000)
    assert len(assert_same(values)) == 2000
    buf, starts, lens = pack(values)
    assert decode_columns(buf, starts, lens, NOW, FUTURE_NS)[0].text is buf  # nothing appended


def test_random_valid_ticks_in_any_layout() -> None:
    values = random_records(2, 3000)
    spans = assert_same(values)
    assert len(spans) > 1000  # most are accepted: the test exercises both paths


def test_every_invalid_case_of_the_tick_contract() -> None:
    invalid = [
        b"not json", None, b"[1, 2]", orjson.dumps({**GOOD, "price": None}),
        orjson.dumps({**GOOD, "price": "1.0"}), orjson.dumps({**GOOD, "price": 0.0}),
        orjson.dumps({**GOOD, "price": -1.0}), b'{"symbol":"A","event_ns":1,"price":Infinity}',
        orjson.dumps({**GOOD, "quantity": -0.1}), orjson.dumps({**GOOD, "side": "long"}),
        orjson.dumps({**GOOD, "event_ns": 1.5}), orjson.dumps({**GOOD, "event_ns": True}),
        orjson.dumps({**GOOD, "symbol": ""}), orjson.dumps({**GOOD, "trade_id": [1]}),
        orjson.dumps({k: v for k, v in GOOD.items() if k != "recv_ns"}),
        orjson.dumps({**GOOD, "event_ns": NOW + 10_000_000_000}),
        orjson.dumps({**GOOD, "price": 3}), orjson.dumps({**GOOD, "trade_id": 9}),
        orjson.dumps({**GOOD, "quantity": 0.0}), orjson.dumps({**GOOD, "extra": [1, 2]}),
        orjson.dumps({**GOOD, "side": "BUY"}), orjson.dumps({**GOOD, "quantity": float("nan")}),
        orjson.dumps({k: v for k, v in GOOD.items() if k != "side"}), b"{", b"", b"{}", b"null",
        orjson.dumps({**GOOD, "price": 1e308}).replace(b"1e308", b"1e309"),
        orjson.dumps({**GOOD, "quantity": -0.0}), orjson.dumps({**GOOD, "event_ns": -(2**63)}),
        orjson.dumps(GOOD) + b" ", orjson.dumps(GOOD) + b"x", b"\xef\xbb\xbf" + orjson.dumps(GOOD),
        orjson.dumps(GOOD).replace(b'"buy"', b'"b\\u0075y"'),
        orjson.dumps(GOOD)[:-1] + b',"price":2.5}', orjson.dumps(GOOD)[:-1] + b',"price":"2"}',
        orjson.dumps(GOOD).replace(b'"quantity":0.5', b'"quantity":-0'),
        orjson.dumps(GOOD).replace(b'"quantity":0.5', b'"quantity":-0e0'),
        orjson.dumps(GOOD).replace(b',"side"', b',\x0b"side"'),
        orjson.dumps(GOOD).replace(b',"side"', b',\x0c"side"'),
        orjson.dumps(GOOD).replace(b',"side"', b',\xc2\xa0"side"'),
    ]  # fmt: skip
    assert_same(invalid)


def test_fuzzed_records() -> None:
    rng = np.random.default_rng(3)
    valid = [v for v in encoded_ticks(4, 300) + random_records(5, 300) if v is not None]
    mutants = [mutate(valid[int(rng.integers(len(valid)))], rng) for _ in range(3000)]
    overflow = [m for m in mutants if out_of_int64(m)]
    values: list[bytes | None] = [m for m in mutants if not out_of_int64(m)]
    spans = assert_same(values)
    assert 0 < len(spans) < len(values)
    assert overflow
    # beyond int64 is a schema error (dead-lettered), never an exception for the batch
    _, rejected = decode_columns(*pack(overflow), 2**70, 0)
    assert [r.reason for r in rejected] == ["schema"] * len(overflow)
    assert_same(overflow + values[:50])


def test_ints_at_the_int64_edges() -> None:
    edges = [2**63 - 1, 2**63, -(2**63) + 1, -(2**63), 10**18, 10**19, 0]
    values: list[bytes | None] = [
        orjson.dumps({**GOOD, name: 0}).replace(f'"{name}":0'.encode(), f'"{name}":{e}'.encode())
        for name in ("event_ns", "recv_ns", "trade_id")
        for e in edges + [-e for e in edges] + [10**30]
    ]
    assert any(out_of_int64(v) for v in values)  # rejected as schema by both decoders
    assert_same(values, now_ns=2**63 - 1)  # limit beyond int64: clamped, every event passes
    assert_same(values, now_ns=-(2**64))  # and below it: none does


def test_batch_size_1_equals_batch_size_n() -> None:
    values = random_records(6, 400) + encoded_ticks(7, 100) + [None, b"{"]
    whole, rejected = decode_columns(*pack(values), NOW, FUTURE_NS)
    one_by_one = [decode_columns(*pack([v]), NOW, FUTURE_NS) for v in values]
    assert [r.index for r in rejected] == [i for i, (s, _) in enumerate(one_by_one) if not len(s)]
    assert [(r.reason, r.detail) for r in rejected] == [
        (r.reason, r.detail) for _, rs in one_by_one for r in rs
    ]
    singles = [s for s, _ in one_by_one if len(s)]
    assert whole.symbols() == [s.symbols()[0] for s in singles]
    assert whole.trade_ids() == [s.trade_ids()[0] for s in singles]
    for name in ("event_ns", "recv_ns", "is_buy", "sym_hash", "sym_len", "tid_len"):
        assert getattr(whole, name).tolist() == [getattr(s, name)[0] for s in singles], name
    assert bits(whole.price) == bits(np.array([s.price[0] for s in singles]))
    assert bits(whole.quantity) == bits(np.array([s.quantity[0] for s in singles]))


def test_empty_batch_and_bad_layout() -> None:
    spans, rejected = decode_columns(*pack([]), NOW, FUTURE_NS)
    assert (len(spans), rejected, spans.symbols()) == (0, [], [])
    buf, starts, lens = pack([orjson.dumps(GOOD)])
    with pytest.raises(ValueError, match="outside buf"):
        decode_columns(buf, starts, lens + 1, NOW, FUTURE_NS)
    with pytest.raises(ValueError, match="outside buf"):
        decode_columns(buf, starts - 1, lens, NOW, FUTURE_NS)


def test_a_writable_buffer_and_int32_offsets_decode_alike() -> None:
    buf, starts, lens = pack(random_records(10, 200))
    want, rejected = decode_columns(buf, starts, lens, NOW, FUTURE_NS)
    got, got_rejected = decode_columns(
        np.array(buf), starts.astype(np.int32), lens.astype(np.int32), NOW, FUTURE_NS
    )
    assert (got.trade_ids(), got.index.tolist(), got_rejected) == (
        want.trade_ids(), want.index.tolist(), rejected,
    )  # fmt: skip


def float_tokens(rng: np.random.Generator) -> list[str]:
    """Random doubles' shortest repr, their 17-digit spelling, short decimals, tricky cases."""
    doubles = rng.integers(0, 2**64, 20_000, dtype=np.uint64).view(np.float64)
    doubles = doubles[np.isfinite(doubles)]
    tokens = [repr(float(d)) for d in doubles[:10_000]]
    tokens += [f"{float(d):.16e}" for d in doubles[10_000:]]
    mantissas = rng.integers(0, 2**53 + 2, 5000)
    tokens += [f"{m}e{e}" for m, e in zip(mantissas, rng.integers(-25, 25, 5000), strict=True)]
    return tokens + TRICKY_FLOATS


@pytest.mark.parametrize("parse", [parse_tokens_numpy, parse_tokens_arrow, parse_tokens])
def test_token_parsers_round_like_python_float(parse: Callable[..., np.ndarray]) -> None:
    tokens = [t for t in float_tokens(np.random.default_rng(8)) if len(t) <= 32]
    data = [t.encode() for t in tokens]
    off = np.zeros(len(data) + 1, np.int64)
    off[1:] = np.cumsum([len(t) for t in data])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow or underflow warnings either
        got = parse(np.frombuffer(b"".join(data), np.uint8), off, len(data))
    want = [struct.unpack("<Q", struct.pack("<d", float(t)))[0] for t in tokens]
    assert bits(got) == want
    assert len(data) >= ARROW_MIN


def test_decoded_floats_are_correctly_rounded() -> None:
    """Through the whole decoder (the scan's exact case included), and orjson agrees."""
    tokens = float_tokens(np.random.default_rng(9))
    base = orjson.dumps({**GOOD, "price": 1.0, "quantity": 2.0})
    values: list[bytes | None] = []
    for k, token in enumerate(tokens):
        field = b'"quantity":2.0' if k % 2 else b'"price":1.0'
        values.append(base.replace(field, field.split(b":")[0] + b":" + token.encode()))
    spans = assert_same(values)
    # a JSON integer is an int to orjson: -0 is 0.0
    want = {k: float(int(t) if t.lstrip("-").isdigit() else t) for k, t in enumerate(tokens)}
    for r, k in enumerate(spans.index.tolist()):
        got = spans.quantity[r] if k % 2 else spans.price[r]
        assert bits(np.array([got])) == bits(np.array([want[k]])), tokens[k]
    assert len(spans) > 0.4 * len(tokens)


def test_symbol_table_maps_rows_by_bytes_not_by_hash() -> None:
    values = [orjson.dumps({**GOOD, "symbol": s}) for s in ["BTC/USDT", "ETH/USDT", "XRP/ETH"]]
    values.append(orjson.dumps(GOOD).replace(b'"BTC/USDT"', b'"BTC\\/USDT"'))  # slow path
    values.append(orjson.dumps({**GOOD, "symbol": 'we"ird'}))
    spans, _ = decode_columns(*pack(values), NOW, FUTURE_NS)
    table = SymbolTable(capacity=2)
    assert table.lookup(spans).tolist() == [-1] * 5
    table.add(b"BTC/USDT", 4)
    table.add(b'we\\"ird', 6)  # JSON-escaped content
    assert table.lookup(spans).tolist() == [4, -1, -1, 4, 6]
    # a wrong mapping under ETH/USDT's hash: the bytes differ, so it must not match
    table._insert(symbol_hash(b"ETH/USDT"), b"SOL/USDT", 9)
    assert table.lookup(spans).tolist() == [4, -1, -1, 4, 6]
    table.add(b"ETH/USDT", 5)  # now the real one, probed past the impostor
    assert table.lookup(spans).tolist() == [4, 5, -1, 4, 6]
    table.add(b"BTC/USDT", 7)  # re-mapped
    for i in range(100):  # grows well past its capacity
        table.add(f"S{i}".encode(), 100 + i)
    assert table.lookup(spans).tolist() == [7, 5, -1, 7, 6]
    assert len(table) == 104
    many = [orjson.dumps({**GOOD, "symbol": f"S{i}"}) for i in range(100)]
    assert table.lookup(decode_columns(*pack(many), NOW, 0)[0]).tolist() == list(range(100, 200))
    with pytest.raises(ValueError, match=">= 0"):
        table.add(b"X", -1)


def test_hash_is_fnv1a_64() -> None:
    for content in [b"", b"a", b"BTC/USDT", "é".encode(), bytes(range(256))]:
        assert symbol_hash(content) == fnv1a_reference(content)
    assert symbol_hash(b"a") == 0xAF63DC4C8601EC8C  # the published test vector


def test_warm_up() -> None:
    warm_up()
    assert math.isfinite(decode_columns(*pack([orjson.dumps(GOOD)]), NOW, 0)[0].price[0])


def test_symbols_longer_than_the_limit_are_rejected_by_both_paths() -> None:
    def tick(symbol: str) -> bytes:
        return Tick(symbol, NOW - 10, 1.0, 1.0, "buy", "1", NOW - 5).encode()

    # 64 characters pass however many bytes they take; 65 fail, on either path
    fits = ["x" * MAX_SYMBOL_LEN, "é" * MAX_SYMBOL_LEN, "😀" * MAX_SYMBOL_LEN]
    too_long = ["x" * (MAX_SYMBOL_LEN + 1), "é" * (MAX_SYMBOL_LEN + 1)]
    spans = assert_same([tick(s) for s in fits + too_long])
    assert spans.symbols() == fits
    _, rejected = decode_columns(*pack([tick(s) for s in too_long]), NOW, FUTURE_NS)
    assert [(r.reason, "at most 64" in r.detail) for r in rejected] == [("schema", True)] * 2
