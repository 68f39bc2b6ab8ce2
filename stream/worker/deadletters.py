"""Bad records are data: each goes to the dead-letter topic as it arrived, with a reason."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import numpy as np
from prometheus_client import Counter

from stream.contracts.tick import Rejected
from stream.kafka.base import SignalSink
from stream.kafka.fetched import Fetched

DEAD_LETTERS = Counter("dead_letters_total", "Records sent to the dead-letter topic", ["reason"])

DETAIL_BYTES = 1000  # a detail is cut to this many bytes


class DeadLetters:
    """Sends records to `topic` with headers `reason`, `detail` and `source` (where from)."""

    def __init__(self, sink: SignalSink, topic: str) -> None:
        """Send through `sink`."""
        self.sink = sink
        self.topic = topic

    async def send(
        self, fetched: Fetched, record: int, reason: str, detail: str
    ) -> asyncio.Future[Any]:
        """Record `record` of `fetched`, as it arrived; the future resolves on the ack."""
        DEAD_LETTERS.labels(reason).inc()
        where = f"{fetched.topic}/{fetched.partition[record]}/{fetched.offset[record]}"
        headers = [
            ("reason", reason.encode()),
            ("detail", detail.encode()[:DETAIL_BYTES]),
            ("source", where.encode()),
        ]
        return await self.sink.send_record(
            self.topic, fetched.value(record), fetched.key(record), headers
        )

    def select(
        self,
        record_of_row: np.ndarray,
        late: np.ndarray,
        stale: np.ndarray,
        rejected: Iterable[Rejected],
        replayed: np.ndarray | None,
    ) -> list[tuple[int, str, str]]:
        """(record, reason, detail) of a micro-batch's dead letters, except replayed records.

        Args:
            record_of_row: Per decoded row, its record in the micro-batch.
            late: Per row, older than its symbol's open bar.
            stale: Per row, past the staleness deadline.
            rejected: Records that failed to decode or validate.
            replayed: Per record, True where it already has a signal (None: none has).
        """
        out = []
        for mask, reason, detail in (
            (late, "late", "older than the open bar"),
            (stale, "stale", "past the staleness deadline"),
        ):
            for record in record_of_row[mask].tolist():
                if replayed is None or not replayed[record]:
                    out.append((record, reason, detail))
        for bad in rejected:
            if replayed is None or not replayed[bad.index]:
                out.append((bad.index, bad.reason, bad.detail))
        return out
