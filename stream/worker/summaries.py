"""The worker's hook for the quality monitor: the accepted ticks of each commit, as `BatchSummary`.

Each micro-batch adds its rows (`SummaryPublisher.add`, a few column copies); every
offset commit first sends what gathered since the last one (`SummaryPublisher.flush`,
called by `CommitTracker`) and waits for its acknowledgement. So the monitor gets a
record per commit (about every `commit_interval_s` under load), not one per
micro-batch: a summary's build and its Produce cost per micro-batch was about a
quarter of the worker's CPU. A commit never covers a tick whose row is not
acknowledged: at least once, as the signals.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class _Rows:
    """One micro-batch's accepted rows, in columns (`features`: the scored rows only)."""

    model: str
    version: str
    slots: np.ndarray
    event_ns: np.ndarray
    price: np.ndarray
    direction: np.ndarray
    scored: np.ndarray
    features: np.ndarray


def summarize(names: Sequence[str], parts: Sequence[_Rows]) -> BatchSummary:
    """One summary of `parts` (micro-batches of one model version, in stream order).

    Args:
        names: The symbol of each feature slot (`FeatureEngine.symbols`).
        parts: What `SummaryPublisher.add` kept of each micro-batch.
    """
    slots = np.concatenate([p.slots for p in parts])
    # slots are small integers: the distinct ones in slot order, and each row's index
    # into them, without the sort np.unique would make
    present = np.flatnonzero(np.bincount(slots)) if len(slots) else slots
    position = np.empty(int(present[-1]) + 1 if len(present) else 0, np.int32)
    position[present] = np.arange(len(present), dtype=np.int32)
    return BatchSummary(
        parts[0].model,
        parts[0].version,
        tuple(names[slot] for slot in present.tolist()),
        position[slots],
        np.concatenate([p.event_ns for p in parts]),
        np.concatenate([p.price for p in parts]),
        np.concatenate([p.direction for p in parts]),
        np.concatenate([p.features for p in parts]),
    )


class SummaryPublisher:
    """Gathers accepted ticks per micro-batch; sends them at each commit, keyed by group.

    The key (the worker's consumer group) keeps one worker's summaries on one
    partition, in order.
    """

    def __init__(
        self, sink: SignalSink, topic: str, key: bytes, threshold: float, names: Sequence[str]
    ) -> None:
        """Send through `sink`; `key` picks the partition (the worker's consumer group).

        `names` is the feature engine's symbol per slot (it grows as symbols arrive;
        a slot is never given to another symbol).
        """
        self.sink = sink
        self.names = names
        self.topic = topic
        self.key = key
        self.threshold = threshold
        self._parts: list[_Rows] = []

    def add(
        self,
        spans: TickSpans,
        slots: np.ndarray,
        accepted: np.ndarray,
        scored: np.ndarray,
        scores: np.ndarray,
        features: np.ndarray,
        model: LoadedModel,
    ) -> None:
        """Keep a micro-batch's `accepted` rows until the next `flush`.

        Args:
            spans: The decoded micro-batch.
            slots: Feature slot of each row (one per symbol).
            accepted: Rows whose price counts (not late, not replayed).
            scored: Rows whose signal carries the model's call.
            scores: P(up) per row (NaN where not scored).
            features: Feature rows of the micro-batch.
            model: The version that scored it.
        """
        rows = np.flatnonzero(accepted)
        if not rows.size:
            return
        called = scored[rows]
        direction = np.full(len(rows), FLAT, np.int8)
        direction[called] = np.where(scores[rows[called]] >= self.threshold, UP, DOWN)
        self._parts.append(
            _Rows(
                model.name,
                model.version,
                slots[rows],
                spans.event_ns[rows],
                spans.price[rows],
                direction,
                called,
                features[rows[called]].astype(np.float32),
            )
        )

    @property
    def pending(self) -> int:
        """Micro-batches gathered since the last `flush`."""
        return len(self._parts)

    async def flush(self) -> list[asyncio.Future[Any]]:
        """Queue what was gathered; the futures resolve on the acks.

        One record per run of micro-batches scored by one model version, split so
        that none holds more than `MAX_ROWS` ticks (a backlog, a high rate).
        """
        parts, self._parts = self._parts, []
        acks = []
        for run in _runs(parts):
            acks.extend(
                [
                    await self.sink.send_record(
                        self.topic, summarize(self.names, piece).encode(), self.key
                    )
                    for piece in _pieces(run)
                ]
            )
        return acks


def _runs(parts: list[_Rows]) -> list[list[_Rows]]:
    """Consecutive micro-batches of the same model version."""
    runs: list[list[_Rows]] = []
    for part in parts:
        if runs and (runs[-1][0].model, runs[-1][0].version) == (part.model, part.version):
            runs[-1].append(part)
        else:
            runs.append([part])
    return runs


def _pieces(run: list[_Rows]) -> list[list[_Rows]]:
    """`run` cut into pieces of at most `MAX_ROWS` rows (a micro-batch over it: cut too)."""
    pieces: list[list[_Rows]] = [[]]
    held = 0
    for part in run:
        for start in range(0, len(part.slots), MAX_ROWS):
            piece = part if len(part.slots) <= MAX_ROWS else _slice(part, start, MAX_ROWS)
            if held + len(piece.slots) > MAX_ROWS and pieces[-1]:
                pieces.append([])
                held = 0
            pieces[-1].append(piece)
            held += len(piece.slots)
    return pieces


def _slice(part: _Rows, start: int, size: int) -> _Rows:
    """Rows `start` to `start + size` of `part`, with the feature rows of those scored."""
    stop = start + size
    first = int(part.scored[:start].sum())
    last = first + int(part.scored[start:stop].sum())
    return _Rows(
        part.model,
        part.version,
        part.slots[start:stop],
        part.event_ns[start:stop],
        part.price[start:stop],
        part.direction[start:stop],
        part.scored[start:stop],
        part.features[first:last],
    )
