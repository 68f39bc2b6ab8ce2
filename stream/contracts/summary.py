"""The summary contract: the accepted ticks of one worker commit interval on `signals.summary`.

What the live quality monitor needs from the stream, in columns: every accepted
tick's symbol, event time and price (the realized direction is computed from
them), the direction the model called (FLAT where it did not score) and the
feature rows it scored. A worker sends one before each offset commit (more where
the model version changed, or past its row limit), holding every micro-batch since
the last: the monitor's message rate is the workers' commit rate, not the tick rate.

Layout: a 4-byte little-endian header length, the header (JSON: model, version,
symbols, rows, features), then the columns as raw little-endian arrays: symbol
index (int32), event_ns (int64), price (float64), direction (int8), and the
feature rows of the scored ticks (float32, row-major).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import orjson

from tickserve.errors import DataError

_LEN = struct.Struct("<I")
_COLUMNS = (("symbol_index", "<i4"), ("event_ns", "<i8"), ("price", "<f8"), ("direction", "i1"))


@dataclass(frozen=True, slots=True)
class BatchSummary:
    """Consecutive micro-batches of one model version, as the monitor sees them.

    Attributes:
        model: Registered model name.
        version: Version that scored the batch.
        symbols: Distinct symbols; `symbol_index` points into it.
        symbol_index: (n,) int32, per tick.
        event_ns: (n,) int64, per tick.
        price: (n,) float64, per tick.
        direction: (n,) int8: UP, DOWN, or FLAT where the tick was not scored.
        features: (m, k) float32: the feature rows of the scored ticks, in tick order.
    """

    model: str
    version: str
    symbols: tuple[str, ...]
    symbol_index: np.ndarray
    event_ns: np.ndarray
    price: np.ndarray
    direction: np.ndarray
    features: np.ndarray

    def __len__(self) -> int:
        return len(self.event_ns)

    def encode(self) -> bytes:
        """The record value.

        >>> s = BatchSummary("m", "3", ("A",), np.zeros(2, np.int32), np.array([1, 2]),
        ...                  np.array([1.0, 2.0]), np.array([1, 0], np.int8), np.ones((1, 2)))
        >>> d = BatchSummary.decode(s.encode())
        >>> d.version, d.symbols, d.price.tolist(), d.features.shape
        ('3', ('A',), [1.0, 2.0], (1, 2))
        """
        n, k = len(self.event_ns), (self.features.shape[1] if self.features.ndim == 2 else 0)
        header = orjson.dumps(
            {
                "model": self.model,
                "version": self.version,
                "symbols": list(self.symbols),
                "rows": n,
                "scored": len(self.features),
                "features": k,
            }
        )
        parts = [_LEN.pack(len(header)), header]
        for name, dtype in _COLUMNS:
            parts.append(np.ascontiguousarray(getattr(self, name), dtype).tobytes())
        parts.append(np.ascontiguousarray(self.features, "<f4").tobytes())
        return b"".join(parts)

    @classmethod
    def decode(cls, raw: bytes) -> BatchSummary:
        """Parse a record value (the arrays are read-only views of `raw`).

        Raises:
            DataError: The value is not a summary.
        """
        try:
            (length,) = _LEN.unpack_from(raw)
            doc = orjson.loads(raw[_LEN.size : _LEN.size + length])
            n, m, k = int(doc["rows"]), int(doc["scored"]), int(doc["features"])
            offset = _LEN.size + length
            columns = []
            for _, dtype in _COLUMNS:
                column = np.frombuffer(raw, dtype, n, offset)
                offset += column.nbytes
                columns.append(column)
            features = np.frombuffer(raw, "<f4", m * k, offset).reshape(m, k)
            if offset + features.nbytes != len(raw):
                raise ValueError(f"{len(raw) - offset - features.nbytes} bytes left over")
            index, event_ns, price, direction = columns
            symbols = tuple(doc["symbols"])
            return cls(
                doc["model"], doc["version"], symbols, index, event_ns, price, direction, features
            )
        except (ValueError, KeyError, TypeError, struct.error, orjson.JSONDecodeError) as exc:
            raise DataError(f"not a batch summary: {exc}") from exc
