"""The signal contract: one JSON object per scored tick on topic `signals`, keyed by symbol."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import orjson

# Header "t" of every signal: when its micro-batch was received, decoded, featured,
# scored and encoded (ns since the epoch) -- the in-process latency breakdown.
STAGES = struct.Struct("<5q")

# Direction of a signal: the model's call, or FLAT for a tick whose features are not ready.
UP, DOWN, FLAT = 1, -1, 0


@dataclass(frozen=True, slots=True)
class Signal:
    """A decoded signal (consumers and tests; the worker encodes with `encode_signals`).

    Attributes:
        symbol: Instrument.
        trade_id: The tick it answers (one signal per tick).
        event_ns: The tick's exchange event time.
        recv_ns: When the feed received the tick (tick-to-signal latency starts here).
        emit_ns: When the worker had scored the tick's micro-batch.
        model: Registered model name.
        version: Model version that scored it ("" when not scored).
        score: P(up) from the model, or None when features were not ready.
        direction: UP, DOWN or FLAT.
        ready: Whether the features were complete (the model saw the row).
    """

    symbol: str
    trade_id: str
    event_ns: int
    recv_ns: int
    emit_ns: int
    model: str
    version: str
    score: float | None
    direction: int
    ready: bool

    @classmethod
    def decode(cls, raw: bytes) -> Signal:
        """Parse a record value from `signals`."""
        doc = orjson.loads(raw)
        return cls(**doc)


_TEMPLATE = (
    b'{"symbol":%b,"trade_id":%b,"event_ns":%d,"recv_ns":%d,"emit_ns":%d,'
    b'"model":%b,"version":%b,"score":%b,"direction":%d,"ready":%b}'
)


def encode_signals(
    symbols: list[str],
    trade_ids: list[str],
    event_ns: list[int],
    recv_ns: list[int],
    emit_ns: int,
    model: str,
    version: str,
    scores: list[float | None],
    threshold: float,
) -> list[bytes]:
    """Serialize a batch of signals (field names as in `Signal`).

    Strings and scores go through orjson (escaping, NaN as null); the constant parts
    are encoded once per batch, the rest with one bytes template per signal.
    A score of None (features not ready) gives direction FLAT and an empty version.

    >>> raw = encode_signals(["A"], ["7"], [1], [2], 3, "m", "4", [0.75], 0.5)[0]
    >>> Signal.decode(raw).direction, Signal.decode(raw).version
    (1, '4')
    """
    dumps = orjson.dumps
    model_b, version_b, empty_b = dumps(model), dumps(version), dumps("")
    names: dict[str, bytes] = {}
    out = []
    for i, symbol in enumerate(symbols):
        sym_b = names.get(symbol)
        if sym_b is None:
            sym_b = names[symbol] = dumps(symbol)
        score = scores[i]
        if score is None:
            score_b, direction, ver_b, ready_b = b"null", FLAT, empty_b, b"false"
        else:
            score_b, ver_b, ready_b = dumps(score), version_b, b"true"
            direction = UP if score >= threshold else DOWN
        out.append(
            _TEMPLATE
            % (
                sym_b,
                dumps(trade_ids[i]),
                event_ns[i],
                recv_ns[i],
                emit_ns,
                model_b,
                ver_b,
                score_b,
                direction,
                ready_b,
            )
        )
    return out
