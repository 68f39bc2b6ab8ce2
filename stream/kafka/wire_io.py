"""The default data plane: ticks and signals over `stream.kafka.wire`'s own connections.

aiokafka stays the control plane through its public API
(`stream.kafka.aiokafka_io.GroupSource`: group, assignment, rebalance callbacks,
commits) and sends the rare single records (dead letters, shadow scores); the
fetcher keeps its own positions and asks its own Metadata for leaders. Both connect
as `DataPlaneConfig.security` says; `stream.kafka.aiokafka_io` is aiokafka's own
data path.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import TopicPartition

from stream.kafka import wire
from stream.kafka.aiokafka_io import GroupSource, ProducerSink
from stream.kafka.base import DataPlane, DataPlaneConfig, Rebalance, RecordBatches
from stream.kafka.clients import MAX_PARTITION_FETCH_BYTES
from stream.kafka.fetched import Fetched
from stream.kafka.wire import WireFetcher, WireProducer


class WireSource(GroupSource):
    """A `TickSource` whose records come through `WireFetcher` (aiokafka's fetcher idles)."""

    def __init__(self, config: DataPlaneConfig) -> None:
        """Make the consumer and the fetcher (in the running event loop)."""
        super().__init__(config)
        self.fetcher = WireFetcher(
            self.consumer,
            config.topic,
            config.fetch_max_wait_ms,
            partition_max_bytes=MAX_PARTITION_FETCH_BYTES,
            gaps=self.gaps,
            security=config.security,
            bootstrap=config.bootstrap,
            reset="earliest",  # as `make_consumer`'s auto_offset_reset
        )

    def revoking(self, partitions: set[TopicPartition]) -> None:
        """Stop fetching `partitions` before the worker commits what it has acknowledged."""
        super().revoking(partitions)
        self.fetcher.revoked(partitions)

    def assigning(self, partitions: set[TopicPartition]) -> None:
        """Take the new assignment before the worker seeks in it; fetch none of it yet."""
        self.fetcher.assigned(partitions)

    def settled(self, partitions: set[TopicPartition]) -> None:
        """The worker has positioned the new assignment: fetch it (aiokafka's stays paused)."""
        self.fetcher.settled()

    async def start(self, rebalance: Rebalance) -> None:
        """Load the response parser, then join the group."""
        wire.warm_up()
        await super().start(rebalance)

    async def poll(self, timeout_ms: int) -> Fetched:
        """What the fetches in flight brought (waiting up to `timeout_ms`), as columns."""
        return await self.fetcher.poll(timeout_ms)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Fetch `tp` from `offset` on."""
        self.fetcher.seek(tp, offset)

    async def seek_to_beginning(self, tp: TopicPartition) -> None:
        """Fetch `tp` from its first offset on (resolved through the consumer)."""
        await self.consumer.seek_to_beginning(tp)
        self.fetcher.forget(tp)

    async def log_id(self, topic: str) -> str:
        """`topic`'s id from a Metadata request sent now ("" if the broker gives none)."""
        leaders = self.fetcher.leaders
        await leaders.refresh([topic])
        topic_id = leaders.topic_id(topic)
        return "" if topic_id is None else topic_id.hex()

    async def close(self) -> None:
        """Close the fetch connections, then leave the group."""
        try:
            await self.fetcher.close()
        finally:
            await super().close()


class WireSink(ProducerSink):
    """A `SignalSink` whose record batches go out as our own Produce requests.

    A Produce shares the source's connection to the leader when no Fetch waits there,
    so it leaves in one write with the next Fetch.
    """

    def __init__(self, config: DataPlaneConfig, share: WireSource) -> None:
        """Borrow the source's leaders and fetch connections."""
        super().__init__(config)
        self.wire = WireProducer(config.bootstrap, share=share.fetcher, security=config.security)

    async def partitions(self, topic: str) -> int:
        """How many partitions `topic` has; its leaders are asked for now, not on the first send."""
        await self.wire.leaders.refresh([topic])
        return await super().partitions(topic)

    async def send(self, topic: str, batches: RecordBatches) -> list[asyncio.Future[Any]]:
        """One Produce per leader, no task on a connection that is up."""
        return self.wire.send(topic, batches)

    async def close(self) -> None:
        """Close our own connections, then the producer."""
        try:
            await self.wire.close()
        finally:
            await super().close()


def open_dataplane(config: DataPlaneConfig) -> DataPlane:
    """The wire data plane for `config` (call inside the running event loop)."""
    source = WireSource(config)
    return DataPlane(source, WireSink(config, source))
