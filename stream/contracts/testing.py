"""The tick decoder held to its reference, for tests and fuzzing (`make fuzz`).

`disagreement` reads a micro-batch of record values twice: with `decode_columns` (the
Numba scanner of `stream.contracts.tickscan` and its fallbacks) and with `decode_tick`
(orjson and the validator, one record at a time). The two must accept the same records,
refuse the others with the same reason and detail, and read the same fields, floats
bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stream.contracts.tick import Tick, decode_tick
from stream.contracts.tickcodec import decode_columns, pack
from tickserve.errors import InvalidTick

# (reason, detail) of a refused record, or the tick read from it
Outcome = Tick | tuple[str, str]


def reference(values: Sequence[bytes | None], now_ns: int, max_future_ns: int) -> list[Outcome]:
    """Per record: the tick `decode_tick` reads, or (reason, detail) of its refusal."""
    out: list[Outcome] = []
    for raw in values:
        try:
            out.append(decode_tick(raw, now_ns, max_future_ns))
        except InvalidTick as exc:
            out.append((exc.reason, exc.detail))
    return out


def scanned(values: Sequence[bytes | None], now_ns: int, max_future_ns: int) -> list[Outcome]:
    """The same, read by `decode_columns` from one packed micro-batch."""
    spans, rejected = decode_columns(*pack(values), now_ns, max_future_ns)
    out: list[Outcome | None] = [None] * len(values)
    for bad in rejected:
        out[bad.index] = (bad.reason, bad.detail)
    symbols, trade_ids = spans.symbols(), spans.trade_ids()
    for row, index in enumerate(spans.index.tolist()):
        if out[index] is not None:
            raise AssertionError(f"record {index} both accepted and rejected")
        out[index] = Tick(
            symbols[row],
            int(spans.event_ns[row]),
            float(spans.price[row]),
            float(spans.quantity[row]),
            "buy" if spans.is_buy[row] else "sell",
            trade_ids[row],
            int(spans.recv_ns[row]),
        )
    missing = [i for i, one in enumerate(out) if one is None]
    if missing:
        raise AssertionError(f"records {missing} neither accepted nor rejected")
    return [one for one in out if one is not None]


def _bits(x: float) -> int:
    return int(np.float64(x).view(np.uint64))


def _key(one: Outcome) -> tuple[object, ...]:
    if isinstance(one, tuple):
        return one
    return (one.symbol, one.event_ns, _bits(one.price), _bits(one.quantity), one.side,
            one.trade_id, one.recv_ns)  # fmt: skip


def disagreement(values: Sequence[bytes | None], now_ns: int, max_future_ns: int) -> str | None:
    """The first record the two paths read differently, described; None if they agree.

    >>> good = b'{"symbol":"A","event_ns":1,"price":2.5,"quantity":1.0,"side":"buy",'
    >>> good += b'"trade_id":"7","recv_ns":3}'
    >>> disagreement([good, good[:-1], None, b"[]"], 10, 0) is None
    True
    """
    want = reference(values, now_ns, max_future_ns)
    got = scanned(values, now_ns, max_future_ns)
    for i, (a, b) in enumerate(zip(want, got, strict=True)):
        if _key(a) != _key(b):
            return f"record {i} {values[i]!r}: per record {a!r}, scanner {b!r}"
    return None
