"""The default data plane: ticks and signals over `stream.kafka.wire`'s own connections.

aiokafka stays the control plane through its public API
(`stream.kafka.aiokafka_io.GroupSource`: group, assignment, rebalance callbacks,
commits); the fetcher keeps its own positions and asks its own Metadata for leaders,
and single records (dead letters, summaries, shadow scores) go as batches of one
beside the signals. Both connect as `DataPlaneConfig.security` says;
`stream.kafka.aiokafka_io` is aiokafka's own data path.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

from aiokafka import TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from stream.kafka import wire
from stream.kafka.aiokafka_io import GroupSource, ProducerSink
from stream.kafka.base import DataPlane, DataPlaneConfig, Headers, Rebalance, RecordBatches
from stream.kafka.clients import MAX_PARTITION_FETCH_BYTES
from stream.kafka.fetched import Fetched
from stream.kafka.signalbatch import record_batch
from stream.kafka.wire import WireFetcher, WireProducer, settle

logger = logging.getLogger(__name__)


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
        self._partitioner = DefaultPartitioner()  # what aiokafka's producer keys with
        self._partitions: dict[str, list[int]] = {}

    async def partitions(self, topic: str) -> int:
        """How many partitions `topic` has; its leaders are asked for now, not on the first send."""
        await self.wire.leaders.refresh([topic])
        return await super().partitions(topic)

    async def send(self, topic: str, batches: RecordBatches) -> list[asyncio.Future[Any]]:
        """One Produce per leader, no task on a connection that is up."""
        return self.wire.send(topic, batches)

    async def send_record(
        self, topic: str, value: bytes | None, key: bytes | None, headers: Headers = ()
    ) -> asyncio.Future[Any]:
        """One record as a batch of its own, on the partition aiokafka's producer would pick.

        Should the wire producer give it up (a topic it finds no leader for, as after a
        broker restart with empty storage), the record goes again through aiokafka's
        producer, whose Metadata request lets the broker create the topic where it
        creates topics on demand, as it did the first time.
        """
        partitions = self._partitions.get(topic)
        if partitions is None:
            partitions = self._partitions[topic] = list(range(await self.partitions(topic)))
        partition = self._partitioner(key, partitions, partitions)
        batch = record_batch(key, value, headers, time.time_ns() // 1_000_000)
        [ack] = self.wire.send(topic, [(partition, batch, 1)])
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        ack.add_done_callback(functools.partial(self._sent, done, topic, value, key, headers))
        return done

    def _sent(
        self,
        done: asyncio.Future[Any],
        topic: str,
        value: bytes | None,
        key: bytes | None,
        headers: Headers,
        ack: asyncio.Future[Any],
    ) -> None:
        if ack.cancelled() or ack.exception() is None:
            settle(done, ack)
            return
        logger.warning(
            "single record sent again through aiokafka's producer",
            extra={"topic": topic, "error": repr(ack.exception())},
        )
        self._partitions.pop(topic, None)  # the topic may have come back with other partitions
        again = asyncio.ensure_future(self._through_producer(topic, value, key, headers))
        again.add_done_callback(functools.partial(settle, done))

    async def _through_producer(
        self, topic: str, value: bytes | None, key: bytes | None, headers: Headers
    ) -> None:
        await (await super().send_record(topic, value, key, headers))

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
