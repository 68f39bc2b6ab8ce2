"""The default data plane: ticks and signals over `stream.kafka.wire`'s own connections.

aiokafka stays the control plane (`stream.kafka.aiokafka_io.GroupSource`: group,
assignment, commits, metadata) and sends the rare single records (dead letters,
shadow scores). Both connect as `DataPlaneConfig.security` says; `stream.kafka.aiokafka_io`
is aiokafka's own data path.
"""

from __future__ import annotations

import asyncio
from typing import Any

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
        )

    async def start(self, rebalance: Rebalance) -> None:
        """Load the response parser, then join the group."""
        wire.warm_up()
        await super().start(rebalance)

    async def poll(self, timeout_ms: int) -> Fetched:
        """What the fetches in flight brought (waiting up to `timeout_ms`), as columns."""
        return await self.fetcher.poll(timeout_ms)

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
        """Borrow the producer's metadata and the source's fetch connections."""
        super().__init__(config)
        self.wire = WireProducer(self.producer, share=share.fetcher, security=config.security)

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
