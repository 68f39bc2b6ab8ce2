"""The data plane on aiokafka's own data path (getmany): for brokers the wire client does not serve.

`GroupSource` is also the control plane of `stream.kafka.wire_io`: the group, the
assignment, the rebalance callbacks, positions and commits stay aiokafka's there,
through its public API.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError

from stream.kafka.aiokafka_adapter import send_batches
from stream.kafka.base import DataPlane, DataPlaneConfig, Headers, Rebalance, RecordBatches
from stream.kafka.clients import make_consumer, make_producer, start_client, wait_assigned
from stream.kafka.fetched import Fetched, FetchedParts, GapRetries
from tickserve.errors import OffsetCommitFailed

logger = logging.getLogger(__name__)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Forwards aiokafka's rebalance callbacks to the source's `Rebalance`."""

    def __init__(self, source: GroupSource) -> None:
        self.source = source

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.source.revoking(revoked)
        if self.source.rebalance is not None:
            await self.source.rebalance.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.source.assigning(assigned)
        try:
            if self.source.rebalance is not None:
                await self.source.rebalance.on_assigned(assigned)
        finally:
            self.source.settled(assigned)


class GroupSource:
    """A `TickSource` over an aiokafka group consumer: `getmany`'s records as columns.

    A fetch that skips offsets is read again from the gap (`GapRetries`: the local
    broker answers with batches whose predecessors are not readable yet, and
    `getmany` alone would skip them for good): the records up to the gap are handed
    out and the consumer seeks back to it, until the gap has been seen `limit` times.
    """

    def __init__(self, config: DataPlaneConfig) -> None:
        """Make the consumer (in the running event loop); `start` joins the group."""
        self.config = config
        self.rebalance: Rebalance | None = None
        self.gaps = GapRetries()  # the local broker's not-yet-readable batches
        self._expected: dict[TopicPartition, int] = {}  # the next offset each partition owes
        self.consumer: AIOKafkaConsumer = make_consumer(
            config.bootstrap,
            config.group_id,
            [config.topic],
            config.fetch_max_wait_ms,
            config.max_batch,
            listener=_Listener(self),
            security=config.security,
        )

    def revoking(self, partitions: set[TopicPartition]) -> None:
        """The group takes `partitions` away (before `Rebalance.on_revoked`)."""
        for tp in partitions:
            self._expected.pop(tp, None)

    def assigning(self, partitions: set[TopicPartition]) -> None:
        """The group's new assignment (before `Rebalance.on_assigned`, which may seek).

        Nothing is fetched from `partitions` until `settled`: records fetched from
        where the consumer would start, before `on_assigned` has restored the state
        and moved the position, would be applied to the wrong state.
        """
        self.consumer.pause(*partitions)

    def settled(self, partitions: set[TopicPartition]) -> None:
        """`Rebalance.on_assigned` has returned (or raised): fetch `partitions` now."""
        self.consumer.resume(*partitions)

    async def start(self, rebalance: Rebalance) -> None:
        """Join the group (its first assignment may run inside)."""
        self.rebalance = rebalance
        await start_client(self.consumer, self.config.bootstrap, self.config.security)

    async def wait_assigned(self) -> None:
        """Return once the group has assigned partitions."""
        await wait_assigned(self.consumer)

    async def poll(self, timeout_ms: int) -> Fetched:
        """`getmany`'s records (waiting up to `timeout_ms`), as columns."""
        consumer = self.consumer
        topic = self.config.topic
        for tp in consumer.assignment():  # where each partition starts: for the gap check
            if tp not in self._expected and tp.topic == topic:
                self._expected[tp] = await consumer.position(tp)
        parts = FetchedParts()
        for tp, records in (await consumer.getmany(timeout_ms=timeout_ms)).items():
            if tp.topic != topic or not records:
                continue
            records, next_offset = self._up_to_gap(tp, records)
            if records:
                parts.add_records(tp, records)
            parts.next_offsets[tp] = next_offset
            high_watermark = consumer.highwater(tp)
            if high_watermark is not None:
                parts.high_watermarks[tp] = high_watermark
        return parts.build(topic)

    def _up_to_gap(self, tp: TopicPartition, records: Sequence[Any]) -> tuple[Sequence[Any], int]:
        """The records before the first skipped offset, and the offset to go on from.

        A gap still there after `gaps.limit` reads is accepted (compaction and
        transaction markers skip offsets too).
        """
        expected = self._expected.get(tp, records[0].offset)
        taken, next_offset, seek = self.gaps.cut(tp, [r.offset for r in records], expected)
        if seek:
            self.consumer.seek(tp, next_offset)
        self._expected[tp] = next_offset
        return records[:taken], next_offset

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit `offsets`; OffsetCommitFailed when the group has moved on."""
        try:
            await self.consumer.commit(offsets)
        except CommitFailedError as exc:
            where = {(tp.topic, tp.partition): offset for tp, offset in offsets.items()}
            raise OffsetCommitFailed(self.config.group_id, where, str(exc)) from exc

    async def committed(self, tp: TopicPartition) -> int | None:
        """The group's committed offset of `tp`."""
        offset: int | None = await self.consumer.committed(tp)
        return offset

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Read `tp` from `offset` on."""
        self.consumer.seek(tp, offset)
        self._expected[tp] = offset

    async def seek_to_beginning(self, tp: TopicPartition) -> None:
        """Read `tp` from its first offset on."""
        await self.consumer.seek_to_beginning(tp)
        self._expected.pop(tp, None)

    async def log_range(self, tp: TopicPartition) -> tuple[int, int]:
        """The partition's log start offset and its end (ListOffsets, public API)."""
        start = await self.consumer.beginning_offsets([tp])
        end = await self.consumer.end_offsets([tp])
        return int(start[tp]), int(end[tp])

    async def log_id(self, topic: str) -> str:
        """Always "": aiokafka's Metadata requests predate topic ids (v10)."""
        return ""

    async def close(self) -> None:
        """Leave the group."""
        await self.consumer.stop()


class ProducerSink:
    """A `SignalSink` over an aiokafka producer: prebuilt batches through `send_batch`."""

    def __init__(self, config: DataPlaneConfig) -> None:
        """Make the producer (in the running event loop); `start` connects it."""
        self.config = config
        self.producer = make_producer(config.bootstrap, config.linger_ms, config.security)

    async def start(self) -> None:
        """Connect."""
        await start_client(self.producer, self.config.bootstrap, self.config.security)

    async def partitions(self, topic: str) -> int:
        """How many partitions `topic` has (asks the broker once)."""
        return len(await self.producer.partitions_for(topic))

    async def send(self, topic: str, batches: RecordBatches) -> list[asyncio.Future[Any]]:
        """Queue the batches; aiokafka keeps one in flight per partition (in order)."""
        return await send_batches(self.producer, topic, batches)

    async def send_record(
        self, topic: str, value: bytes | None, key: bytes | None, headers: Headers = ()
    ) -> asyncio.Future[Any]:
        """Queue one record."""
        future: asyncio.Future[Any] = await self.producer.send(
            topic, value, key=key, headers=list(headers) or None
        )
        return future

    async def close(self) -> None:
        """Flush and close."""
        await self.producer.stop()


def open_dataplane(config: DataPlaneConfig) -> DataPlane:
    """The aiokafka data path for `config` (call inside the running event loop)."""
    return DataPlane(GroupSource(config), ProducerSink(config))
