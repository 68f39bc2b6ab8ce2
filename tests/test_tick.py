"""The tick contract: what decodes, and the dead-letter reason for what does not."""

from __future__ import annotations

import orjson
import pytest

from stream.contracts.tick import Tick, decode_batch, decode_tick
from tests.helpers import GOOD, NOW
from tickserve.errors import InvalidTick


def test_round_trip() -> None:
    tick = decode_tick(orjson.dumps(GOOD), NOW, 0)
    assert tick == Tick(**GOOD)  # type: ignore[arg-type]
    assert decode_tick(tick.encode(), NOW, 0) == tick


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json", "decode"),
        (None, "decode"),
        (b"[1, 2]", "schema"),
        (orjson.dumps({**GOOD, "price": None}), "schema"),
        (orjson.dumps({**GOOD, "price": "1.0"}), "schema"),
        (orjson.dumps({**GOOD, "price": 0.0}), "price"),
        (orjson.dumps({**GOOD, "price": -1.0}), "price"),
        (b'{"symbol":"A","event_ns":1,"price":Infinity}', "decode"),
        (orjson.dumps({**GOOD, "quantity": -0.1}), "quantity"),
        (orjson.dumps({**GOOD, "side": "long"}), "side"),
        (orjson.dumps({**GOOD, "event_ns": 1.5}), "schema"),
        (orjson.dumps({**GOOD, "event_ns": True}), "schema"),
        (orjson.dumps({**GOOD, "symbol": ""}), "schema"),
        (orjson.dumps({**GOOD, "trade_id": [1]}), "schema"),
        (orjson.dumps({k: v for k, v in GOOD.items() if k != "recv_ns"}), "schema"),
        (orjson.dumps({**GOOD, "event_ns": NOW + 10_000_000_000}), "future"),
    ],
)
def test_invalid_ticks_carry_a_reason(raw: bytes | None, reason: str) -> None:
    with pytest.raises(InvalidTick) as err:
        decode_tick(raw, NOW, 5_000_000_000)
    assert err.value.reason == reason


def test_integer_trade_id_and_price_are_accepted() -> None:
    tick = decode_tick(orjson.dumps({**GOOD, "trade_id": 7, "price": 3}), NOW, 0)
    assert (tick.trade_id, tick.price) == ("7", 3.0)


def test_decode_batch_keeps_order_and_sets_aside_bad_records() -> None:
    values = [orjson.dumps({**GOOD, "trade_id": str(i)}) for i in range(5)]
    values[2] = b"{"
    cols, rejected = decode_batch(values, NOW, 0)
    assert cols.trade_ids == ["0", "1", "3", "4"]
    assert cols.index.tolist() == [0, 1, 3, 4]
    assert [(r.index, r.reason) for r in rejected] == [(2, "decode")]
    assert cols.price.tolist() == [60000.01] * 4


def test_fast_and_slow_paths_agree() -> None:
    """decode_batch's inline checks accept exactly what validate accepts, with its reasons."""
    variants = [
        GOOD,
        {**GOOD, "price": 3},  # integer price: slow path, accepted
        {**GOOD, "trade_id": 9},  # integer trade id: slow path, accepted
        {**GOOD, "quantity": 0.0},
        {**GOOD, "extra": [1, 2]},  # unknown fields are ignored
        {**GOOD, "side": "BUY"},
        {**GOOD, "quantity": float("nan")},  # orjson writes null
        {**GOOD, "event_ns": NOW + 10**10},
        {k: v for k, v in GOOD.items() if k != "side"},
    ]
    values = [orjson.dumps(v) for v in variants] + [b"[1,2]", b"{", None]
    cols, rejected = decode_batch(values, NOW, 0)
    for i, raw in enumerate(values):
        try:
            tick = decode_tick(raw, NOW, 0)
        except InvalidTick as exc:
            assert (i, exc.reason) in [(r.index, r.reason) for r in rejected]
        else:
            k = cols.index.tolist().index(i)
            assert (cols.symbols[k], cols.trade_ids[k], cols.price[k]) == (
                tick.symbol, tick.trade_id, tick.price,
            )  # fmt: skip
    assert len(cols) + len(rejected) == len(values)


def test_signals_round_trip() -> None:
    from stream.contracts.signal import DOWN, FLAT, UP, Signal, encode_signals

    raw = encode_signals(
        ['we"ird', "B", "C"], ["1", "2", "3"], [10, 11, 12], [20, 21, 22], [0, 1, 1],
        [5, 6, 7], 30, "m", "7", [0.9, None, 0.1], 0.5,
    )  # fmt: skip
    got = [Signal.decode(r) for r in raw]
    assert [s.symbol for s in got] == ['we"ird', "B", "C"]
    assert [s.direction for s in got] == [UP, FLAT, DOWN]
    assert [s.version for s in got] == ["7", "", "7"]
    assert [s.ready for s in got] == [True, False, True]
    assert got[0] == Signal('we"ird', "1", 10, 20, 30, "m", "7", 0.9, UP, True, 0, 5)
    assert [(s.partition, s.offset) for s in got] == [(0, 5), (1, 6), (1, 7)]
