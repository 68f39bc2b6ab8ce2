"""Shadow scoring: the challenger's scores go to their own topic, never to signals."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from inference.batcher import BatchScores
from stream.contracts.signal import encode_signals
from stream.contracts.tickcodec import TickSpans
from stream.kafka.base import SignalSink
from stream.kafka.fetched import Fetched


class ShadowSignals:
    """Sends the challenger's signals for the rows it scored, one record each, to `topic`."""

    def __init__(self, sink: SignalSink, topic: str, threshold: float) -> None:
        """Send through `sink`; `topic` "" sends nothing."""
        self.sink = sink
        self.topic = topic
        self.threshold = threshold

    async def send(
        self,
        spans: TickSpans,
        fetched: Fetched,
        ready: np.ndarray,
        scored: BatchScores,
        emit_ns: int,
    ) -> list[asyncio.Future[Any]]:
        """The challenger's signals of a micro-batch (none without a challenger or topic)."""
        challenger = scored.challenger
        if challenger is None or scored.shadow is None or not self.topic:
            return []
        shadow = np.full(len(spans), np.nan)
        shadow[ready] = scored.shadow
        rows = np.flatnonzero(~np.isnan(shadow))
        values = encode_signals(
            spans.symbols(rows),
            spans.trade_ids(rows),
            spans.event_ns[rows].tolist(),
            spans.recv_ns[rows].tolist(),
            fetched.partition[spans.index[rows]].tolist(),
            fetched.offset[spans.index[rows]].tolist(),
            emit_ns,
            challenger.name,
            challenger.version,
            shadow[rows].tolist(),
            self.threshold,
        )
        send = self.sink.send_record
        return [
            await send(self.topic, value, fetched.key(i))
            for i, value in zip(spans.index[rows].tolist(), values, strict=True)
        ]
