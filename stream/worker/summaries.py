"""The worker's hook for the quality monitor: one `BatchSummary` record per micro-batch."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np

from inference.registry import LoadedModel
from stream.contracts.signal import DOWN, FLAT, UP
from stream.contracts.summary import BatchSummary
from stream.contracts.tickcodec import TickSpans
from stream.kafka.base import SignalSink

# accepted ticks per summary record: about 70 bytes each with 12 features, so a record
# stays far below the 1 MB a Kafka producer sends by default
MAX_ROWS = 4096


def summarize(
    spans: TickSpans,
    names: Sequence[str],
    slots: np.ndarray,
    accepted: np.ndarray,
    scored: np.ndarray,
    scores: np.ndarray,
    features: np.ndarray,
    model: LoadedModel,
    threshold: float,
) -> BatchSummary:
    """The summary of a micro-batch's `accepted` ticks, in columns.

    Args:
        spans: The decoded micro-batch.
        names: The symbol of each feature slot (`FeatureEngine.symbols`).
        slots: Feature slot of each row (one per symbol).
        accepted: Rows whose price counts (not late, not replayed).
        scored: Rows whose signal carries the model's call.
        scores: P(up) per row (NaN where not scored).
        features: Feature rows of the micro-batch.
        model: The version that scored it.
        threshold: P(up) at or above which a signal says UP.
    """
    rows = np.flatnonzero(accepted)
    held = slots[rows]
    # slots are small integers: the distinct ones in slot order, and each row's index
    # into them, without the sort np.unique would make
    present = np.flatnonzero(np.bincount(held)) if len(held) else held
    position = np.empty(int(present[-1]) + 1 if len(present) else 0, np.int32)
    position[present] = np.arange(len(present), dtype=np.int32)
    symbols = tuple(names[slot] for slot in present.tolist())
    called = scored[rows]
    direction = np.full(len(rows), FLAT, np.int8)
    direction[called] = np.where(scores[rows[called]] >= threshold, UP, DOWN)
    return BatchSummary(
        model.name,
        model.version,
        symbols,
        position[held],
        spans.event_ns[rows],
        spans.price[rows],
        direction,
        features[rows[called]].astype(np.float32),
    )


class SummaryPublisher:
    """Sends each micro-batch's summary to `topic`, keyed so that one worker's land in order."""

    def __init__(
        self, sink: SignalSink, topic: str, key: bytes, threshold: float, names: Sequence[str]
    ) -> None:
        """Send through `sink`; `key` picks the partition (the worker's consumer group).

        `names` is the feature engine's symbol per slot (it grows as symbols arrive).
        """
        self.sink = sink
        self.names = names
        self.topic = topic
        self.key = key
        self.threshold = threshold

    async def send(
        self,
        spans: TickSpans,
        slots: np.ndarray,
        accepted: np.ndarray,
        scored: np.ndarray,
        scores: np.ndarray,
        features: np.ndarray,
        model: LoadedModel,
    ) -> list[asyncio.Future[Any]]:
        """Queue the summary; the futures resolve on the acks (none when no tick was accepted).

        A micro-batch of more than `MAX_ROWS` accepted ticks (a backlog read in one
        fetch) goes as several summaries, each well under a Kafka record's size limit.
        """
        rows = np.flatnonzero(accepted)
        acks = []
        for start in range(0, len(rows), MAX_ROWS):
            part = np.zeros(len(accepted), np.bool_)
            part[rows[start : start + MAX_ROWS]] = True
            summary = summarize(
                spans, self.names, slots, part, scored, scores, features, model, self.threshold
            )
            acks.append(await self.sink.send_record(self.topic, summary.encode(), self.key))
        return acks
