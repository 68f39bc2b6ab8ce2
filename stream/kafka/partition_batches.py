"""Keyed records sent as one record batch per partition, through aiokafka's public batch API.

`producer.send` spends ~16 us of CPU a record (the murmur2 partitioner, cluster
lookups, a future and an accumulator append each); a file replay is bound by it.
`PartitionBatches` appends records to one open batch per partition
(`producer.create_batch()`) and hands it to `producer.send_batch` when it is full or
`linger_ms` old, with one future per batch. A key's partition is the one
`producer.send` picks (aiokafka's `DefaultPartitioner`: murmur2 of the key over the
topic's sorted partitions), computed once per distinct key. Records without a key go
round-robin over the partitions (aiokafka picks one at random).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

# A record larger than this goes alone through `producer.send`, whose size checks
# (max_request_size) then refuse it as they refuse it today; ticks are ~150 bytes.
ALONE_BYTES = 64 * 1024
# 5,000 (the per-record bound it replaces) stalled a replay on the broker's ack latency;
# 20,000 ticks are a few MiB of batches.
MAX_UNACKED_RECORDS = 20_000

Headers = list[tuple[str, bytes]]


class PartitionBatches:
    """Open record batches of one topic, one per partition, and the sent ones not yet acked.

    Records of one partition keep their order. At most `max_unacked` sent records
    wait for their acknowledgement (plus the open batches): `append` waits for the
    oldest batches' acks beyond that. An acknowledged batch runs the `on_ack`
    callbacks of its records; a failed one raises its `KafkaError` from `append` or
    `drain`, and `acknowledged` counts the records acknowledged before it.
    """

    def __init__(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        linger_ms: int,
        max_unacked: int = MAX_UNACKED_RECORDS,
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._linger_ns = linger_ms * 1_000_000
        self._max_unacked = max_unacked
        self._partitions: list[int] = []
        self._partitioner = DefaultPartitioner()
        self._partition_of: dict[bytes, int] = {}
        self._round_robin = 0
        # open batches, oldest first (a partition's batch is re-inserted when reopened)
        self._open: dict[int, Any] = {}
        self._opened_ns: dict[int, int] = {}
        self._counts: dict[int, int] = {}
        self._on_ack: dict[int, list[Callable[[], object]]] = {}
        self._unacked: deque[tuple[asyncio.Future[Any], int]] = deque()
        self._unacked_records = 0
        self.acknowledged = 0

    async def partition(self, key: bytes | None) -> int:
        """The partition of `key`: `producer.send`'s for a key, round-robin without one."""
        if not self._partitions:
            self._partitions = sorted(await self._producer.partitions_for(self._topic))
        if key is None:
            self._round_robin += 1
            return self._partitions[self._round_robin % len(self._partitions)]
        partition = self._partition_of.get(key)
        if partition is None:
            partition = self._partitioner(key, self._partitions, self._partitions)
            self._partition_of[key] = partition
        return partition

    async def append(
        self,
        key: bytes | None,
        value: bytes,
        now_ns: int,
        headers: Headers | None = None,
        on_ack: Callable[[], object] | None = None,
    ) -> None:
        """Add a record to its partition's open batch; send the batches that are due.

        Raises:
            KafkaError: The producer refused a record or a sent batch failed.
        """
        partition = await self.partition(key)
        if len(value) + (len(key) if key is not None else 0) > ALONE_BYTES:
            await self._send_alone(partition, key, value, headers, on_ack)
        else:
            builder = self._open.get(partition)
            if builder is None:
                builder = self._start(partition, now_ns)
            if builder.append(timestamp=None, key=key, value=value, headers=headers) is None:
                await self._send(partition)  # full
                builder = self._start(partition, now_ns)
                builder.append(timestamp=None, key=key, value=value, headers=headers)
            self._counts[partition] += 1
            if on_ack is not None:
                self._on_ack[partition].append(on_ack)
        lingered = now_ns - self._linger_ns
        if next(iter(self._opened_ns.values()), now_ns) <= lingered:
            for partition, opened_ns in list(self._opened_ns.items()):
                if opened_ns > lingered:
                    break
                await self._send(partition)

    async def flush(self) -> None:
        """Send every open batch (acknowledgements are not awaited)."""
        for partition in list(self._open):
            await self._send(partition)

    async def drain(self) -> int:
        """Send every open batch and wait for all acknowledgements; the records acknowledged.

        Raises:
            KafkaError: A sent batch failed.
        """
        await self.flush()
        while self._unacked:
            await self._ack_oldest()
        return self.acknowledged

    def _start(self, partition: int, now_ns: int) -> Any:
        builder = self._open[partition] = self._producer.create_batch()
        self._opened_ns[partition] = now_ns
        self._counts[partition] = 0
        self._on_ack[partition] = []
        return builder

    async def _send(self, partition: int) -> None:
        builder = self._open.pop(partition, None)
        if builder is None:
            return
        del self._opened_ns[partition]
        count = self._counts.pop(partition)
        callbacks = self._on_ack.pop(partition)
        builder.close()
        sent = await self._producer.send_batch(builder, self._topic, partition=partition)
        await self._track(sent, count, callbacks)

    async def _send_alone(
        self,
        partition: int,
        key: bytes | None,
        value: bytes,
        headers: Headers | None,
        on_ack: Callable[[], object] | None,
    ) -> None:
        await self._send(partition)  # what was appended before goes first
        sent = await self._producer.send(
            self._topic, value, key=key, partition=partition, headers=headers
        )
        await self._track(sent, 1, [on_ack] if on_ack is not None else [])

    async def _track(
        self, sent: asyncio.Future[Any], count: int, callbacks: list[Callable[[], object]]
    ) -> None:
        for callback in callbacks:
            sent.add_done_callback(lambda _, run=callback: run())  # type: ignore[misc]
        self._unacked.append((sent, count))
        self._unacked_records += count
        while self._unacked_records > self._max_unacked:
            await self._ack_oldest()

    async def _ack_oldest(self) -> None:
        sent, count = self._unacked[0]
        await sent
        self._unacked.popleft()
        self._unacked_records -= count
        self.acknowledged += count
