"""In-memory fakes of the data plane (`stream.kafka.base`) for unit tests of its users."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiokafka import TopicPartition

from stream.kafka.base import Headers, Rebalance, RecordBatches
from stream.kafka.fetched import Fetched
from tickserve.errors import OffsetCommitFailed


def fetched_of(
    topic: str,
    records: Sequence[tuple[int, int, bytes | None, bytes | None]],
    next_offsets: dict[TopicPartition, int] | None = None,
    timestamp_ms: int = 0,
) -> Fetched:
    """A `Fetched` of (partition, offset, key, value) records, laid out as a fetch would be.

    Without `next_offsets`, each partition's is the offset after its last record.
    Every record gets the Kafka timestamp `timestamp_ms` (0: now).
    """
    timestamp_ms = timestamp_ms or time.time_ns() // 1_000_000
    buf = bytearray()
    spans: list[tuple[int, int, int, int]] = []
    for _, _, key, value in records:
        key_at = len(buf)
        buf += key or b""
        value_at = len(buf)
        buf += value or b""
        spans.append(
            (key_at, -1 if key is None else len(key), value_at, -1 if value is None else len(value))
        )
    if next_offsets is None:
        next_offsets = {}
        for partition, offset, _, _ in records:
            tp = TopicPartition(topic, partition)
            next_offsets[tp] = max(next_offsets.get(tp, 0), offset + 1)
    cols = np.array(spans, np.int64).reshape(-1, 4).T
    return Fetched(
        topic,
        np.frombuffer(bytes(buf), np.uint8),
        np.array([r[0] for r in records], np.int32),
        np.array([r[1] for r in records], np.int64),
        cols[0],
        cols[1],
        cols[2],
        cols[3],
        np.full(len(records), timestamp_ms, np.int64),
        next_offsets,
    )


class FakeSource:
    """A `TickSource` that hands out the batches queued with `push`; commits are recorded.

    Attributes:
        commits: Every successful commit, in order.
        committed_offsets: The group's committed offset per partition.
        seeks: (partition, offset) of every seek; offset -1 for `seek_to_beginning`.
        refuse_commits: When True, `commit` raises OffsetCommitFailed (a rebalance).
        log_ranges: `log_range`'s answer per partition.
    """

    def __init__(self, topic: str = "ticks") -> None:
        """Empty, not started."""
        self.topic = topic
        self.rebalance: Rebalance | None = None
        self.batches: deque[Fetched] = deque()
        self.commits: list[dict[TopicPartition, int]] = []
        self.committed_offsets: dict[TopicPartition, int] = {}
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.refuse_commits = False
        self.closed = False
        self.log_ranges: dict[TopicPartition, tuple[int, int]] = {}  # default: (0, 2**62)
        self.topic_id = ""  # `log_id`'s answer: set another to recreate the topic

    def push(self, fetched: Fetched) -> None:
        """Queue a batch for `poll`."""
        self.batches.append(fetched)

    async def start(self, rebalance: Rebalance) -> None:
        """Remember who hears of rebalances."""
        self.rebalance = rebalance

    async def wait_assigned(self) -> None:
        """Assigned at once."""

    async def poll(self, timeout_ms: int) -> Fetched:
        """The next queued batch, or an empty one after a short sleep."""
        if self.batches:
            return self.batches.popleft()
        await asyncio.sleep(min(timeout_ms, 5) / 1000)
        return fetched_of(self.topic, [], {})

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Record the commit, or refuse it as a group that moved on would."""
        if self.refuse_commits:
            where = {(tp.topic, tp.partition): o for tp, o in offsets.items()}
            raise OffsetCommitFailed("fake", where, "rebalance in progress")
        self.commits.append(dict(offsets))
        self.committed_offsets.update(offsets)

    async def committed(self, tp: TopicPartition) -> int | None:
        """The recorded committed offset."""
        return self.committed_offsets.get(tp)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Record the seek."""
        self.seeks.append((tp, offset))

    async def seek_to_beginning(self, tp: TopicPartition) -> None:
        """Record the seek (offset -1)."""
        self.seeks.append((tp, -1))

    async def log_range(self, tp: TopicPartition) -> tuple[int, int]:
        """The range set in `log_ranges`, else one that holds every offset."""
        return self.log_ranges.get(tp, (0, 2**62))

    async def log_id(self, topic: str) -> str:
        """`topic_id`."""
        return self.topic_id

    async def close(self) -> None:
        """Mark closed."""
        self.closed = True


@dataclass
class SentRecord:
    """One record `FakeSink.send_record` took."""

    topic: str
    value: bytes | None
    key: bytes | None
    headers: dict[str, bytes] = field(default_factory=dict)


class FakeSink:
    """A `SignalSink` that keeps what it is given; acks resolve when `settle` says so.

    Attributes:
        batches: (topic, partition, batch bytes, record count) of every batch sent.
        records: Every single record sent.
        auto_ack: When True (default) every ack is resolved at once.
    """

    def __init__(self, partitions: int = 4, auto_ack: bool = True) -> None:
        """Topics of `partitions` partitions."""
        self._partitions = partitions
        self.auto_ack = auto_ack
        self.batches: list[tuple[str, int, bytes, int]] = []
        self.records: list[SentRecord] = []
        self.pending: list[asyncio.Future[Any]] = []
        self.closed = False

    async def start(self) -> None:
        """Nothing to connect."""

    async def partitions(self, topic: str) -> int:
        """The configured partition count."""
        return self._partitions

    def _ack(self) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.auto_ack:
            future.set_result(None)
        else:
            self.pending.append(future)
        return future

    def settle(self) -> None:
        """Resolve every ack still pending."""
        for future in self.pending:
            if not future.done():
                future.set_result(None)
        self.pending.clear()

    async def send(self, topic: str, batches: RecordBatches) -> list[asyncio.Future[Any]]:
        """Keep the batches; one ack each."""
        self.batches += [(topic, p, data, count) for p, data, count in batches]
        return [self._ack() for _ in batches]

    async def send_record(
        self, topic: str, value: bytes | None, key: bytes | None, headers: Headers = ()
    ) -> asyncio.Future[Any]:
        """Keep the record; one ack."""
        self.records.append(SentRecord(topic, value, key, dict(headers)))
        return self._ack()

    async def close(self) -> None:
        """Mark closed."""
        self.closed = True
