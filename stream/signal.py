"""The signal contract: one JSON object per scored tick on topic `signals`, keyed by symbol."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import orjson

# Header "t" of every signal: when its micro-batch was received, decoded, featured,
# scored and encoded (ns since the epoch) -- the in-process latency breakdown.
STAGES = struct.Struct("<5q")
STAGE_NAMES = ("received", "decoded", "featured", "scored", "encoded")

# Direction of a signal: the model's call, or FLAT for a tick whose features are not ready.
UP, DOWN, FLAT = 1, -1, 0


@dataclass(frozen=True, slots=True)
class Signal:
    """A decoded signal (consumers and tests; the worker encodes rows directly).

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


def encode_signal(
    symbol: str,
    trade_id: str,
    event_ns: int,
    recv_ns: int,
    emit_ns: int,
    model: str,
    version: str,
    score: float | None,
    direction: int,
) -> bytes:
    """Serialize one signal (field names as in `Signal`)."""
    return orjson.dumps(
        {
            "symbol": symbol,
            "trade_id": trade_id,
            "event_ns": event_ns,
            "recv_ns": recv_ns,
            "emit_ns": emit_ns,
            "model": model,
            "version": version,
            "score": score,
            "direction": direction,
            "ready": score is not None,
        }
    )
