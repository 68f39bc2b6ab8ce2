"""The normalized tick contract: one trade, encoded as an orjson object on topic `ticks`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import orjson

from tickserve.errors import InvalidTick
from tickserve.limits import MAX_SYMBOL_LEN

SIDES = {"buy": True, "sell": False}


@dataclass(frozen=True, slots=True)
class Tick:
    """One trade as the feed publishes it (used at the edges, never in the hot loop).

    Attributes:
        symbol: Instrument, e.g. ``XRP/ETH``; also the Kafka key.
        event_ns: Exchange event time, integer ns since the Unix epoch (UTC).
        price: Trade price, > 0.
        quantity: Traded amount in base units, >= 0.
        side: Taker side, ``buy`` or ``sell``.
        trade_id: Exchange trade id.
        recv_ns: When the feed received (and published) the tick, ns since the epoch.
    """

    symbol: str
    event_ns: int
    price: float
    quantity: float
    side: str
    trade_id: str
    recv_ns: int

    def encode(self) -> bytes:
        """Serialize as the JSON object carried on the `ticks` topic."""
        return orjson.dumps(
            {
                "symbol": self.symbol,
                "event_ns": self.event_ns,
                "price": self.price,
                "quantity": self.quantity,
                "side": self.side,
                "trade_id": self.trade_id,
                "recv_ns": self.recv_ns,
            }
        )


@dataclass(slots=True)
class TickColumns:
    """A decoded micro-batch as columns; `index[i]` is the position of row i in the input."""

    symbols: list[str] = field(default_factory=list)
    trade_ids: list[str] = field(default_factory=list)
    event_ns: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    price: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))
    quantity: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))
    is_buy: np.ndarray = field(default_factory=lambda: np.empty(0, np.bool_))
    recv_ns: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    index: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))

    def __len__(self) -> int:
        return len(self.symbols)


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record that did not make it into the batch, and why (the dead-letter reason)."""

    index: int
    reason: str
    detail: str


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _int_field(doc: dict[str, object], name: str) -> int:
    value = doc.get(name)
    if type(value) is not int:
        raise InvalidTick("schema", f"{name} must be an integer, got {value!r}")
    if not INT64_MIN <= value <= INT64_MAX:  # it is stored as int64 (ns until 2262)
        raise InvalidTick("schema", f"{name} must fit in a signed 64-bit integer, got {value}")
    return value


def _float_field(doc: dict[str, object], name: str) -> float:
    value = doc.get(name)
    if type(value) not in (int, float):
        raise InvalidTick("schema", f"{name} must be a number, got {value!r}")
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number):
        raise InvalidTick(name, f"{name} must be finite, got {number!r}")
    return number


def validate(doc: object, now_ns: int, max_future_ns: int) -> Tick:
    """Check one decoded JSON value against the tick contract.

    Args:
        doc: The value `orjson.loads` returned.
        now_ns: Current wall-clock time in ns (event times beyond now + max_future_ns fail).
        max_future_ns: Tolerated clock skew into the future.

    Returns:
        The tick.

    Raises:
        InvalidTick: With reason ``schema``, ``price``, ``quantity``, ``side`` or ``future``.

    >>> t = validate({"symbol": "A", "event_ns": 1, "price": 2.0, "quantity": 1,
    ...               "side": "buy", "trade_id": "7", "recv_ns": 3}, 10, 0)
    >>> (t.symbol, t.price, t.trade_id)
    ('A', 2.0, '7')
    """
    if not isinstance(doc, dict):
        raise InvalidTick("schema", f"a tick is a JSON object, got {type(doc).__name__}")
    symbol = doc.get("symbol")
    if not isinstance(symbol, str) or not symbol:
        raise InvalidTick("schema", f"symbol must be a non-empty string, got {symbol!r}")
    if len(symbol) > MAX_SYMBOL_LEN:
        raise InvalidTick(
            "schema", f"symbol is {len(symbol)} characters, at most {MAX_SYMBOL_LEN} allowed"
        )
    event_ns = _int_field(doc, "event_ns")
    recv_ns = _int_field(doc, "recv_ns")
    price = _float_field(doc, "price")
    if price <= 0.0:
        raise InvalidTick("price", f"price must be > 0, got {price!r}")
    quantity = _float_field(doc, "quantity")
    if quantity < 0.0:
        raise InvalidTick("quantity", f"quantity must be >= 0, got {quantity!r}")
    side = doc.get("side")
    if side not in SIDES:
        raise InvalidTick("side", f"side must be 'buy' or 'sell', got {side!r}")
    trade_id = doc.get("trade_id")
    if type(trade_id) is int:
        trade_id = str(trade_id)
    if not isinstance(trade_id, str):
        raise InvalidTick("schema", f"trade_id must be a string, got {trade_id!r}")
    if event_ns > now_ns + max_future_ns:
        raise InvalidTick("future", f"event_ns {event_ns} is more than the tolerated skew ahead")
    return Tick(symbol, event_ns, price, quantity, str(side), trade_id, recv_ns)


def decode_tick(raw: bytes | None, now_ns: int, max_future_ns: int) -> Tick:
    """Decode and validate one record value; raises `InvalidTick` with the reason."""
    if raw is None:
        raise InvalidTick("decode", "record has no value")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidTick("decode", f"not JSON: {exc}") from exc
    return validate(doc, now_ns, max_future_ns)


def decode_batch(
    values: Sequence[bytes | None], now_ns: int, max_future_ns: int
) -> tuple[TickColumns, list[Rejected]]:
    """Decode a micro-batch of record values into columns, setting aside the invalid ones.

    The common case (every field present with its canonical JSON type) is checked
    inline; anything else takes `decode_tick`, which accepts what the contract
    allows (an integer price, an integer trade id) and names the reason for the rest.
    """
    loads = orjson.loads
    limit = now_ns + max_future_ns
    inf = math.inf
    symbols: list[str] = []
    trade_ids: list[str] = []
    event_ns: list[int] = []
    price: list[float] = []
    quantity: list[float] = []
    is_buy: list[bool] = []
    recv_ns: list[int] = []
    index: list[int] = []
    rejected: list[Rejected] = []
    for i, raw in enumerate(values):
        try:
            doc = loads(raw)  # type: ignore[arg-type]
            sym, ev, px, qty = doc["symbol"], doc["event_ns"], doc["price"], doc["quantity"]
            side, tid, recv = doc["side"], doc["trade_id"], doc["recv_ns"]
            fast = (
                type(sym) is str
                and sym != ""
                and len(sym) <= MAX_SYMBOL_LEN
                and type(ev) is int
                and type(recv) is int
                and INT64_MIN <= ev <= INT64_MAX
                and INT64_MIN <= recv <= INT64_MAX
                and type(px) is float
                and 0.0 < px < inf
                and type(qty) is float
                and 0.0 <= qty < inf
                and type(tid) is str
                and ev <= limit
                and (side == "buy" or side == "sell")
            )
        except Exception:  # not JSON, not an object, a missing field: the slow path says which
            fast = False
        if not fast:
            try:
                tick = decode_tick(raw, now_ns, max_future_ns)
            except InvalidTick as exc:
                rejected.append(Rejected(i, exc.reason, exc.detail))
                continue
            sym, ev, px, qty, side, tid, recv = (
                tick.symbol,
                tick.event_ns,
                tick.price,
                tick.quantity,
                tick.side,
                tick.trade_id,
                tick.recv_ns,
            )
        symbols.append(sym)
        trade_ids.append(tid)
        event_ns.append(ev)
        price.append(px)
        quantity.append(qty)
        is_buy.append(side == "buy")
        recv_ns.append(recv)
        index.append(i)
    cols = TickColumns(
        symbols=symbols,
        trade_ids=trade_ids,
        event_ns=np.array(event_ns, np.int64),
        price=np.array(price, np.float64),
        quantity=np.array(quantity, np.float64),
        is_buy=np.array(is_buy, np.bool_),
        recv_ns=np.array(recv_ns, np.int64),
        index=np.array(index, np.int64),
    )
    return cols, rejected
