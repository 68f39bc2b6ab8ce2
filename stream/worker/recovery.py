"""Feature state across restarts and rebalances: partition snapshots, restore and replay.

Each partition's symbols are snapshotted with the offset their state reflects
(periodically, when the partition is revoked, and on shutdown), and written only
once that offset is committed. A newly assigned partition is restored from its
snapshot and re-read from the snapshot's offset; records before the committed offset
already have signals, so they only update features (`replayed` marks them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol

import numpy as np
from aiokafka import TopicPartition
from prometheus_client import Counter

from features import snapshot
from features.engine import FeatureEngine
from features.snapshot import Snapshot
from stream.kafka.base import TickSource
from stream.kafka.fetched import Fetched

logger = logging.getLogger(__name__)

REPLAYED = Counter("replayed_ticks_total", "Records re-applied to feature state without signals")
OFFSET_GAPS = Counter("consumer_offset_gaps_total", "Fetched batches that skipped offsets")
STALE_POSITIONS = Counter(
    "stale_positions_total",
    "Snapshots or committed offsets outside their partition's log"
    " (or from another log of the topic) at assignment",
    ["kind"],
)
RANGE_RECHECK_S = 1.0  # ListOffsets may lag a produce for a moment: look again before acting

# (partition, its snapshot), taken now and written once its offset is committed
Snapshots = list[tuple[TopicPartition, Snapshot]]


class SnapshotKeeper(Protocol):
    """Where snapshots live (`features.snapshot.SnapshotStore`)."""

    def save(self, topic: str, partition: int, snap: Snapshot) -> Future[None]:
        """Write in the background; the future never raises."""

    def load(self, topic: str, partition: int) -> Snapshot | None:
        """The partition's latest snapshot, or None."""

    def close(self) -> None:
        """Finish pending writes."""


def _held(offset: int, low: int, high: int) -> bool:
    """Whether the log [low, high] can hold a position at `offset`.

    ListOffsets' end can lag the log's real end (the local broker reported 3,376 while
    3,750 were committed): only a position past twice the reported end counts as lost,
    as after a broker restart with empty storage or a topic recreated, where the log
    is far shorter than the position.
    """
    return low <= offset <= max(2 * high, high + 1)


class Recovery:
    """Which offsets the feature state reflects, per partition, and how to get it back.

    Attributes:
        positions: Per partition, the next offset applied to the feature state.
        replay_until: Per partition being replayed, the committed offset it replays to.
        partition_of: The partition each symbol arrives on (keys pin a symbol to one).
        rebuilt: Partitions whose snapshot or committed offset lay outside their log at
            assignment, or whose snapshot came from another log of the topic, and why
            (rebuilt from the log's start).
        log_ids: Each topic's id at the last assignment, written into its snapshots.
    """

    def __init__(
        self,
        engine: FeatureEngine,
        store: SnapshotKeeper | None,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """No partition yet; `store` None: nothing is snapshotted or restored."""
        self.engine = engine
        self.store = store
        self.interval_s = interval_s
        self._clock = clock
        self.positions: dict[TopicPartition, int] = {}
        self.replay_until: dict[TopicPartition, int] = {}
        self.partition_of: dict[str, int] = {}
        self.rebuilt: dict[TopicPartition, str] = {}  # partitions whose positions were stale
        self.log_ids: dict[str, str] = {}  # each topic's id at the last assignment ("" unknown)
        self._last_snapshot = clock()

    def pin(self, symbols: list[str], partitions: list[int]) -> None:
        """Remember the partition of symbols seen for the first time."""
        for symbol, partition in zip(symbols, partitions, strict=True):
            self.partition_of.setdefault(symbol, partition)

    def check_gaps(self, fetched: Fetched) -> None:
        """Count and log a batch that does not start where the last one of its partition ended.

        Kafka may skip offsets (compaction, transaction markers); none of those apply
        to ticks, so a gap means records were not delivered to us.
        """
        for tp in fetched.next_offsets:
            expected = self.positions.get(tp)
            first = np.flatnonzero(fetched.partition == tp.partition)[:1]
            if expected is not None and first.size and fetched.offset[first[0]] != expected:
                OFFSET_GAPS.inc()
                got = int(fetched.offset[first[0]])
                logger.warning(
                    "offset gap",
                    extra={"partition": tp.partition, "expected": expected, "got": got},
                )

    def applied(self, next_offsets: dict[TopicPartition, int]) -> None:
        """The feature state now reflects every record before these offsets."""
        self.positions.update(next_offsets)

    def replayed(self, fetched: Fetched) -> np.ndarray | None:
        """Per record: True where it already has a signal (re-read after a restore)."""
        if not self.replay_until:
            return None
        out = np.zeros(len(fetched), np.bool_)
        for tp, next_offset in fetched.next_offsets.items():
            until = self.replay_until.get(tp)
            if until is None:
                continue
            out |= (fetched.partition == tp.partition) & (fetched.offset < until)
            if next_offset >= until:
                del self.replay_until[tp]
                logger.info("replay done", extra={"partition": tp.partition, "offset": until})
        REPLAYED.inc(int(out.sum()))
        return out

    def due(self) -> bool:
        """The snapshot interval has passed since the last snapshot."""
        return self._clock() - self._last_snapshot > self.interval_s

    def take(self, partitions: list[TopicPartition] | None = None) -> Snapshots:
        """Copy the state of these partitions' symbols (default: all) with its offsets."""
        self._last_snapshot = self._clock()
        if self.store is None:
            return []
        out = []
        for tp in partitions if partitions is not None else list(self.positions):
            offset = self.positions.get(tp)
            if offset is None or tp in self.replay_until:
                continue  # nothing applied yet, or the state is behind the commit
            symbols = [s for s, p in self.partition_of.items() if p == tp.partition]
            log_id = self.log_ids.get(tp.topic, "")
            out.append((tp, snapshot.take(self.engine, symbols, offset, log_id)))
        return out

    async def write(self, snaps: Snapshots) -> None:
        """Write snapshots (once the offsets they reflect are committed)."""
        store = self.store
        if store is None or not snaps:
            return
        await asyncio.gather(
            *(asyncio.wrap_future(store.save(tp.topic, tp.partition, snap)) for tp, snap in snaps)
        )

    async def restore(
        self, source: TickSource, assigned: set[TopicPartition]
    ) -> dict[TopicPartition, int]:
        """Restore assigned partitions' symbols and position `source` to replay.

        Returns the offset each restored partition now reads from.
        """
        if self.store is None:
            return {}
        starts = {}
        for topic in {tp.topic for tp in assigned}:
            self.log_ids[topic] = await source.log_id(topic)
        for tp in assigned:
            committed, snap = await self._trusted(
                source, tp, await source.committed(tp), self.store.load(tp.topic, tp.partition)
            )
            if snap is not None and snap.spec_hash == self.engine.spec.hash:
                snapshot.restore(self.engine, snap)
                for symbol in snap.symbols:
                    self.partition_of[symbol] = tp.partition
                source.seek(tp, snap.next_offset)
                start = snap.next_offset
            elif committed is not None or tp in self.rebuilt:
                # no usable snapshot, or positions the log no longer holds: rebuild
                # the state from the start of the partition, on a clean slate
                self.engine.reset([s for s, p in self.partition_of.items() if p == tp.partition])
                await source.seek_to_beginning(tp)
                start = 0
            else:
                continue
            if committed and committed > start:
                self.replay_until[tp] = committed
            self.positions[tp] = starts[tp] = start
            logger.info(
                "partition restored",
                extra={
                    "partition": tp.partition,
                    "snapshot": snap is not None,
                    "from_offset": start,
                    "committed": committed,
                },
            )
        return starts

    async def _trusted(
        self,
        source: TickSource,
        tp: TopicPartition,
        committed: int | None,
        snap: Snapshot | None,
    ) -> tuple[int | None, Snapshot | None]:
        """The committed offset and snapshot, each dropped if the log does not hold it.

        A broker restarted with empty storage, a topic deleted and recreated, or an
        offset reset leave positions past the log's end (or before its start): reading
        from there gets nothing, so the worker would wait silently. A dropped committed
        offset means every record the log holds gets its signal again (the group's
        commit no longer describes this log); a dropped snapshot means a rebuild.

        A snapshot taken in another log of the topic (its id differs) is dropped even
        where its offset lies inside this one: the new log may have grown to or past
        it (as many records as before), and reading on from there would skip them.
        """
        log_id = self.log_ids.get(tp.topic, "")
        if snap is not None and snap.log_id and log_id and snap.log_id != log_id:
            why = f"snapshot from another log of the topic (id {snap.log_id}, now {log_id})"
            self._distrust(tp, "snapshot", snap.next_offset, why)
            snap = None
        wanted = [o for o in (committed, None if snap is None else snap.next_offset) if o]
        if not wanted:
            return committed, snap
        low, high = await source.log_range(tp)
        if all(_held(o, low, high) for o in wanted):
            return committed, snap
        await asyncio.sleep(RANGE_RECHECK_S)
        low, high = await source.log_range(tp)
        checks = (
            ("committed", committed),
            ("snapshot", None if snap is None else snap.next_offset),
        )
        for kind, offset in checks:
            if offset and not _held(offset, low, high):
                self._distrust(
                    tp, kind, offset, f"{kind} offset {offset} outside the log [{low}, {high}]"
                )
                if kind == "committed":
                    committed = None
                else:
                    snap = None
        if committed is None and snap is not None:
            snap = None  # state from offsets the group's commit no longer vouches for
        return committed, snap

    def _distrust(self, tp: TopicPartition, kind: str, offset: int, why: str) -> None:
        """Count and log a position dropped at assignment; `tp` is rebuilt."""
        STALE_POSITIONS.labels(kind).inc()
        self.rebuilt[tp] = f"{self.rebuilt[tp]}; {why}" if tp in self.rebuilt else why
        logger.error(
            "position outside the partition's log: rebuilding from what it holds",
            extra={"partition": tp.partition, "kind": kind, "offset": offset, "why": why},
        )

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Partitions taken away (after their last snapshot)."""
        for tp in partitions:
            self.rebuilt.pop(tp, None)
            self.positions.pop(tp, None)
            self.replay_until.pop(tp, None)

    def close(self) -> None:
        """Finish pending snapshot writes."""
        if self.store is not None:
            self.store.close()
