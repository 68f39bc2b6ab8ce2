"""The tick contract: what decodes, and the dead-letter reason for what does not."""

from __future__ import annotations

import orjson
import pytest

from stream.tick import Tick, decode_batch, decode_tick
from tickserve.errors import InvalidTick

NOW = 1_700_000_000_000_000_000
GOOD = {
    "symbol": "BTC/USDT",
    "event_ns": NOW - 1000,
    "price": 60000.01,
    "quantity": 0.5,
    "side": "buy",
    "trade_id": "42",
    "recv_ns": NOW,
}


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
