"""The signal contract: one JSON object per scored tick on topic `signals`, keyed by symbol."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import orjson

from tickserve.errors import UnsupportedSchema

# Header "t" of every signal: when its micro-batch was received, decoded, featured,
# scored and encoded (ns since the epoch) -- the in-process latency breakdown.
STAGES = struct.Struct("<5q")

# Direction of a signal: the model's call, or FLAT for a tick whose features are not ready.
UP, DOWN, FLAT = 1, -1, 0


# Version of the signal schema (MAJOR.MINOR): a minor adds optional fields, which old
# readers ignore; a major removes or changes one, which they refuse.
SCHEMA_VERSION = "1.0"
SCHEMA_MAJOR = 1
NON_FINITE = "non_finite"  # the error of a ready row the model scored NaN or infinite


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
        score: P(up) from the model, or None (features not ready, or an error).
        direction: UP, DOWN or FLAT.
        ready: Whether the features were complete (the model saw the row).
        partition: The tick's partition on the ticks topic.
        offset: The tick's offset there: (partition, offset) names the tick, so a
            consumer drops a redelivered signal by it (delivery is at-least-once).
        error: Why a ready row has no score (NON_FINITE), or None.
        schema_version: The schema the record was written under.
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
    partition: int = -1
    offset: int = -1
    error: str | None = None
    schema_version: str = SCHEMA_VERSION

    @classmethod
    def decode(cls, raw: bytes) -> Signal:
        """Parse a record value from `signals`; fields this version does not know are ignored.

        Raises:
            UnsupportedSchema: The record's schema major version is newer than ours.
        """
        doc = orjson.loads(raw)
        version = str(doc.get("schema_version", SCHEMA_VERSION))
        major = version.partition(".")[0]
        if not major.isdigit() or int(major) > SCHEMA_MAJOR:
            raise UnsupportedSchema(
                f"signal schema {version!r}: this reader knows major {SCHEMA_MAJOR} "
                "(upgrade tickserve)"
            )
        return cls(**{name: doc[name] for name in _FIELDS if name in doc})


_FIELDS = tuple(Signal.__dataclass_fields__)
_TEMPLATE = (
    b'{"schema_version":"%b","symbol":%b,"trade_id":%b,"event_ns":%d,"recv_ns":%d,'
    b'"partition":%d,"offset":%d,"emit_ns":%d,"model":%b,"version":%b,"score":%b,'
    b'"direction":%d,"ready":%b%b}'
)
ERROR_FIELD = b',"error":"%b"' % NON_FINITE.encode()


def encode_signals(
    symbols: list[str],
    trade_ids: list[str],
    event_ns: list[int],
    recv_ns: list[int],
    partitions: list[int],
    offsets: list[int],
    emit_ns: int,
    model: str,
    version: str,
    scores: list[float | None],
    threshold: float,
) -> list[bytes]:
    """Serialize a batch of signals (field names as in `Signal`).

    Strings and scores go through orjson (escaping, NaN as null); the constant parts
    are encoded once per batch, the rest with one bytes template per signal.
    A score of None (features not ready) gives direction FLAT and an empty version;
    a NaN or infinite score (the model failed on a ready row) gives FLAT, the version,
    no score and error NON_FINITE.

    >>> raw = encode_signals(["A"], ["7"], [1], [2], [0], [41], 3, "m", "4", [0.75], 0.5)[0]
    >>> s = Signal.decode(raw)
    >>> s.direction, s.version, (s.partition, s.offset), s.schema_version
    (1, '4', (0, 41), '1.0')
    """
    dumps = orjson.dumps
    model_b, version_b, empty_b = dumps(model), dumps(version), dumps("")
    schema_b = SCHEMA_VERSION.encode()
    names: dict[str, bytes] = {}
    out = []
    for i, symbol in enumerate(symbols):
        sym_b = names.get(symbol)
        if sym_b is None:
            sym_b = names[symbol] = dumps(symbol)
        score = scores[i]
        error = b""
        if score is None:
            score_b, direction, ver_b, ready_b = b"null", FLAT, empty_b, b"false"
        elif not math.isfinite(score):
            score_b, direction, ver_b, ready_b, error = (
                b"null",
                FLAT,
                version_b,
                b"true",
                ERROR_FIELD,
            )
        else:
            score_b, ver_b, ready_b = dumps(score), version_b, b"true"
            direction = UP if score >= threshold else DOWN
        out.append(
            _TEMPLATE
            % (
                schema_b,
                sym_b,
                dumps(trade_ids[i]),
                event_ns[i],
                recv_ns[i],
                partitions[i],
                offsets[i],
                emit_ns,
                model_b,
                ver_b,
                score_b,
                direction,
                ready_b,
                error,
            )
        )
    return out
