"""The data plane on aiokafka's own data path: for brokers the wire client does not serve.

`GroupSource` is also the control plane of `stream.kafka.wire_io`: the group, the
assignment, the rebalance callbacks, positions and commits stay aiokafka's there.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError

from stream.kafka import aiokafka_adapter
from stream.kafka.aiokafka_adapter import drain, send_batches
from stream.kafka.base import DataPlane, DataPlaneConfig, Headers, Rebalance, RecordBatches
from stream.kafka.clients import make_consumer, make_producer, start_client, wait_assigned
from stream.kafka.fetched import Fetched, GapRetries
from tickserve.errors import OffsetCommitFailed


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Forwards aiokafka's rebalance callbacks to the source's `Rebalance`."""

    def __init__(self, source: GroupSource) -> None:
        self.source = source

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if self.source.rebalance is not None:
            await self.source.rebalance.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if self.source.rebalance is not None:
            await self.source.rebalance.on_assigned(assigned)


class GroupSource:
    """A `TickSource` over an aiokafka group consumer, records drained as columns."""

    def __init__(self, config: DataPlaneConfig) -> None:
        """Make the consumer (in the running event loop); `start` joins the group."""
        aiokafka_adapter.install()  # record batches parsed as columns
        self.config = config
        self.rebalance: Rebalance | None = None
        self.gaps = GapRetries()  # the local broker's not-yet-readable batches
        self.consumer: AIOKafkaConsumer = make_consumer(
            config.bootstrap,
            config.group_id,
            [config.topic],
            config.fetch_max_wait_ms,
            config.max_batch,
            listener=_Listener(self),
            security=config.security,
        )

    async def start(self, rebalance: Rebalance) -> None:
        """Load the parsers, then join the group (its first assignment may run inside)."""
        # load (or compile, with a cold Numba cache) before joining the group, not on
        # the first micro-batch while ticks pile up
        aiokafka_adapter.warm_up()
        self.rebalance = rebalance
        await start_client(self.consumer, self.config.bootstrap, self.config.security)

    async def wait_assigned(self) -> None:
        """Return once the group has assigned partitions."""
        await wait_assigned(self.consumer)

    async def poll(self, timeout_ms: int) -> Fetched:
        """What aiokafka's fetcher has buffered (waiting up to `timeout_ms`), as columns."""
        return await drain(self.consumer, self.config.topic, timeout_ms, self.gaps)

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

    async def seek_to_beginning(self, tp: TopicPartition) -> None:
        """Read `tp` from its first offset on."""
        await self.consumer.seek_to_beginning(tp)

    async def log_range(self, tp: TopicPartition) -> tuple[int, int]:
        """The partition's log start offset and its end (ListOffsets, public API)."""
        start = await self.consumer.beginning_offsets([tp])
        end = await self.consumer.end_offsets([tp])
        return int(start[tp]), int(end[tp])

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
