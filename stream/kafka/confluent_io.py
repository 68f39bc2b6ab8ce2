"""The exactly-once data plane: librdkafka's group consumer and transactional producer.

`TICKSERVE_EXACTLY_ONCE=true` selects it. Every commit is a Kafka transaction: the
signals, dead letters, shadow scores and summaries produced since the last commit,
and the input offsets they answer (`send_offsets_to_transaction` with the consumer's
group metadata, KIP-447), become visible together or not at all. A strategy reading
the signals with `isolation.level=read_committed` sees one signal per tick across
crashes and rebalances. The worker's recovery needs nothing more: after a restart it
restores its snapshot and replays up to the committed offset without signals, as it
does at least once. Commits happen between micro-batches (`DataPlane.transactional`),
so a transaction never holds part of a batch.

Why librdkafka: aiokafka's transactional producer sends `InitProducerId` v0 only,
which the local broker refuses; librdkafka's is the client most Kafka shops run with
transactions (docs/architecture.md). Its calls block, so the consumer's run on one
thread of its own (its rebalance callbacks run there and wait for the worker's
`Rebalance` on the event loop) and the producer's transaction calls on another.

A transaction that fails (fenced by a newer instance with the same transactional id,
aborted by the broker, a commit the group refuses after a rebalance) ends the worker
with `TransactionFailed`: what it produced since the last commit is aborted, and the
restarted worker reads on from the committed offsets.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from aiokafka import TopicPartition
from aiokafka.record.memory_records import MemoryRecords
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer
from confluent_kafka import TopicPartition as RdTopicPartition

from stream.kafka.base import DataPlane, DataPlaneConfig, Headers, Rebalance, RecordBatches
from stream.kafka.clients import MAX_PARTITION_FETCH_BYTES
from stream.kafka.fetched import Fetched, FetchedParts, GapRetries
from tickserve.errors import BrokerError, TransactionFailed

logger = logging.getLogger(__name__)

CALL_TIMEOUT_S = 30.0  # one blocking librdkafka call (a transaction step, a lookup)
ASSIGN_TIMEOUT_S = 60.0
# an abort goes before the worker ends; a fenced producer's abort can only time out
# (the local broker answers it so), and the broker aborts at the transaction timeout
ABORT_TIMEOUT_S = 5.0
COMMIT_RETRIES = 3  # a retriable commit error (a timeout) is retried, then fatal
# aiokafka's defaults, so that group membership times the same on every plane (with
# librdkafka's 45 s the local broker took 23 s to assign, with these 5 s)
SESSION_TIMEOUT_MS = 10_000
HEARTBEAT_INTERVAL_MS = 3_000
T = TypeVar("T")


def transactional_id(config: DataPlaneConfig) -> str:
    """The producer's transactional id: the configured one, or `<group>-<host name>`.

    A stable id lets a restarted instance abort its predecessor's open transaction at
    once (`init_transactions`) instead of after the transaction timeout; zombies are
    fenced by the group's generation either way (KIP-447).
    """
    return config.transactional_id or f"{config.group_id}-{socket.gethostname()}"


@dataclass(frozen=True, slots=True)
class _Record:
    """A consumed message as `FetchedParts.add_records` reads records."""

    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int


class TransactionalSink:
    """A `SignalSink` over librdkafka's transactional producer; `commit` ends a transaction.

    Sends return no acknowledgements to wait for: a record is delivered when the
    transaction holding it commits, and a record that fails makes that commit fail.
    """

    def __init__(self, config: DataPlaneConfig) -> None:
        """Make the producer; `start` registers its transactional id."""
        self.config = config
        self.transactional_id = transactional_id(config)
        self.producer = Producer(
            {
                "bootstrap.servers": config.bootstrap,
                "transactional.id": self.transactional_id,
                "linger.ms": config.linger_ms,
                # keyed records land where aiokafka's and the Java client's put them
                "partitioner": "murmur2_random",
                "logger": logger,
                **config.security.librdkafka_config(),
            }
        )
        self._lock = asyncio.Lock()  # no produce while a transaction commits
        self._open = False  # a transaction is begun
        self._calls = concurrent.futures.ThreadPoolExecutor(1, "rdkafka-transactions")

    async def _call(self, step: str, call: Callable[..., T], *args: Any) -> T:
        """Run a blocking producer call off the event loop; its errors as TransactionFailed."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._calls, call, *args)
        except KafkaException as exc:
            raise self._failed(step, exc) from exc

    def _failed(self, step: str, exc: KafkaException) -> TransactionFailed:
        error = exc.args[0] if exc.args else None
        if not isinstance(error, KafkaError):
            return TransactionFailed(self.transactional_id, step, str(exc))
        return TransactionFailed(
            self.transactional_id,
            step,
            error.str(),
            abortable=bool(error.txn_requires_abort()),
            retriable=bool(error.retriable()),
        )

    async def start(self) -> None:
        """Register the transactional id (fencing an older producer with the same id)."""
        await self._call("init_transactions", self.producer.init_transactions, CALL_TIMEOUT_S)

    async def partitions(self, topic: str) -> int:
        """How many partitions `topic` has."""
        metadata = await self._call("metadata", self.producer.list_topics, topic, CALL_TIMEOUT_S)
        described = metadata.topics.get(topic)
        if described is None or described.error is not None or not described.partitions:
            why = described.error if described is not None else "not in the metadata"
            raise BrokerError(f"no partitions of {topic}: {why}", topic=topic)
        return len(described.partitions)

    def _begin(self) -> None:
        if not self._open:
            try:
                self.producer.begin_transaction()
            except KafkaException as exc:
                raise self._failed("begin_transaction", exc) from exc
            self._open = True

    async def _produce(self, topic: str, **record: Any) -> None:
        while True:
            try:
                self.producer.produce(topic, **record)
            except BufferError:  # the local queue is full: let librdkafka send some
                await asyncio.to_thread(self.producer.poll, 0.05)
                continue
            except KafkaException as exc:
                raise self._failed("produce", exc) from exc
            self.producer.poll(0)  # serve delivery reports, so their queue stays short
            return

    async def send(self, topic: str, batches: RecordBatches) -> list[asyncio.Future[Any]]:
        """Produce the batches' records into the open transaction, on their partitions."""
        async with self._lock:
            self._begin()
            for partition, batch, _count in batches:
                records = MemoryRecords(batch)
                while (built := records.next_batch()) is not None:
                    for r in built:
                        await self._produce(
                            topic,
                            value=r.value,
                            key=r.key,
                            partition=partition,
                            timestamp=r.timestamp,
                            headers=list(r.headers),
                        )
        return []

    async def send_record(
        self, topic: str, value: bytes | None, key: bytes | None, headers: Headers = ()
    ) -> asyncio.Future[Any]:
        """Produce one record into the open transaction; the future is already done."""
        async with self._lock:
            self._begin()
            await self._produce(topic, value=value, key=key, headers=list(headers))
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def commit(self, offsets: dict[TopicPartition, int], group_metadata: Any) -> None:
        """Commit the open transaction with the group's next `offsets` in it.

        Raises:
            TransactionFailed: The transaction was aborted (or could not be): nothing
                produced since the last commit is visible to read_committed consumers.
        """
        async with self._lock:
            self._begin()
            positions = [RdTopicPartition(tp.topic, tp.partition, o) for tp, o in offsets.items()]
            try:
                if positions:
                    await self._call(
                        "send_offsets_to_transaction",
                        self.producer.send_offsets_to_transaction,
                        positions,
                        group_metadata,
                        CALL_TIMEOUT_S,
                    )
                await self._commit()
            except TransactionFailed as exc:
                if exc.abortable:  # a fenced or fatal producer cannot abort: the broker will
                    await self._abort()
                raise
            finally:
                self._open = False

    async def _commit(self) -> None:
        for attempt in range(COMMIT_RETRIES):
            try:
                await self._call(
                    "commit_transaction", self.producer.commit_transaction, CALL_TIMEOUT_S
                )
                return
            except TransactionFailed as exc:
                if not exc.retriable or attempt == COMMIT_RETRIES - 1:
                    raise
                logger.warning("transaction commit retried", extra={"error": str(exc)})

    async def _abort(self) -> None:
        try:
            await self._call("abort_transaction", self.producer.abort_transaction, ABORT_TIMEOUT_S)
        except TransactionFailed as exc:  # fenced or fatal: the broker aborts it in time
            logger.warning("transaction abort failed", extra={"error": str(exc)})

    async def close(self) -> None:
        """Abort what no commit took (the worker commits before it closes), then flush."""
        if self._open:
            await self._abort()
            self._open = False
        await asyncio.to_thread(self.producer.flush, CALL_TIMEOUT_S)
        self._calls.shutdown(wait=False)


class ConfluentSource:
    """A `TickSource` over librdkafka's group consumer; commits go into the sink's transaction.

    Positions set while the group assigns partitions (`Rebalance.on_assigned` seeks to
    restore) become the assignment's start offsets. A consume that skips offsets is
    read again from the gap, as `stream.kafka.aiokafka_io.GroupSource` does.
    """

    def __init__(self, config: DataPlaneConfig, sink: TransactionalSink) -> None:
        """Make the consumer; `start` subscribes."""
        self.config = config
        self.sink = sink
        self.rebalance: Rebalance | None = None
        self.gaps = GapRetries()
        self._expected: dict[TopicPartition, int] = {}  # the next offset each partition owes
        self._starts: dict[TopicPartition, int] | None = None  # seeks while assigning
        self._stash: list[Any] = []  # messages consumed while waiting for the assignment
        self._assigned = False
        self._failure: BaseException | None = None  # raised in a rebalance callback
        self._loop: asyncio.AbstractEventLoop | None = None
        self._io = concurrent.futures.ThreadPoolExecutor(1, "rdkafka-consumer")
        common = {
            "bootstrap.servers": config.bootstrap,
            "group.id": config.group_id,
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "logger": logger,
            **config.security.librdkafka_config(),
        }
        # committed offsets and log ranges are asked through a handle that never joins:
        # the group's own handle holds such requests back while it waits for the
        # assignment, which waits on the worker's `on_assigned`, which asks them
        self._lookups = Consumer(common)
        self.consumer = Consumer(
            {
                **common,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": SESSION_TIMEOUT_MS,
                "heartbeat.interval.ms": HEARTBEAT_INTERVAL_MS,
                "fetch.wait.max.ms": config.fetch_max_wait_ms,
                "max.partition.fetch.bytes": MAX_PARTITION_FETCH_BYTES,
            }
        )

    def _wait_on_loop(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` on the event loop from the consumer's thread, and wait for it."""
        assert self._loop is not None
        try:
            asyncio.run_coroutine_threadsafe(coro, self._loop).result()
        except BaseException as exc:
            self._failure = self._failure or exc
            raise

    def _on_assign(self, consumer: Consumer, partitions: list[RdTopicPartition]) -> None:
        assigned = {TopicPartition(p.topic, p.partition) for p in partitions}
        self._starts = {}
        try:
            if self.rebalance is not None:
                self._wait_on_loop(self.rebalance.on_assigned(assigned))
            for p in partitions:
                start = self._starts.get(TopicPartition(p.topic, p.partition))
                if start is not None:
                    p.offset = start
        finally:
            self._starts = None
        consumer.assign(partitions)
        self._assigned = True

    def _on_revoke(self, consumer: Consumer, partitions: list[RdTopicPartition]) -> None:
        revoked = {TopicPartition(p.topic, p.partition) for p in partitions}
        for tp in revoked:
            self._expected.pop(tp, None)
        if self.rebalance is not None:
            self._wait_on_loop(self.rebalance.on_revoked(revoked))
        consumer.unassign()
        self._assigned = False

    async def _in_consumer_thread(self, call: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._io, call, *args)
        finally:
            if self._failure is not None:
                failure, self._failure = self._failure, None
                raise failure

    async def start(self, rebalance: Rebalance) -> None:
        """Subscribe; the group join runs while `wait_assigned` and `poll` consume."""
        self.rebalance = rebalance
        self._loop = asyncio.get_running_loop()
        await self._in_consumer_thread(
            self.consumer.subscribe,
            [self.config.topic],
            self._on_assign,
            self._on_revoke,
            self._on_revoke,  # lost: the commit in on_revoked fails and ends the worker
        )

    async def wait_assigned(self) -> None:
        """Consume (keeping what arrives) until the group has assigned partitions."""
        deadline = time.monotonic() + ASSIGN_TIMEOUT_S
        while not self._assigned:
            if time.monotonic() > deadline:
                topic = self.config.topic
                msg = f"no partitions of {topic} assigned within {ASSIGN_TIMEOUT_S:.0f} s"
                raise BrokerError(msg, topic=topic)
            self._stash += await self._in_consumer_thread(
                self.consumer.consume, self.config.max_batch, 0.1
            )

    def _consume(self, timeout_s: float) -> list[Any]:
        """What has arrived, waiting up to `timeout_s` for the first message only.

        `consume(n, timeout)` alone waits until `n` messages are there or the timeout
        passes: a micro-batch would then wait for `max_batch` ticks (at 20,000 ticks/s
        and 2,000, 100 ms).
        """
        queued: list[Any] = self.consumer.consume(self.config.max_batch, 0)
        if queued:
            return queued
        first = self.consumer.poll(timeout_s)
        if first is None:
            return []
        return [first, *self.consumer.consume(self.config.max_batch - 1, 0)]

    async def poll(self, timeout_ms: int) -> Fetched:
        """Messages consumed since the last call (waiting up to `timeout_ms`), as columns."""
        if self._stash:
            messages, self._stash = self._stash, []
        else:
            messages = await self._in_consumer_thread(self._consume, timeout_ms / 1000)
        by_partition: dict[TopicPartition, list[_Record]] = {}
        for m in messages:
            error = m.error()
            if error is not None:
                if error.fatal():
                    raise BrokerError(f"consumer: {error.str()}", topic=self.config.topic)
                logger.warning("consume error", extra={"error": error.str()})
                continue
            if m.topic() != self.config.topic:
                continue
            tp = TopicPartition(m.topic(), m.partition())
            record = _Record(m.offset(), m.key(), m.value(), m.timestamp()[1])
            by_partition.setdefault(tp, []).append(record)
        parts = FetchedParts()
        for tp, records in by_partition.items():
            taken, next_offset = self._up_to_gap(tp, records)
            if taken:
                parts.add_records(tp, taken)
            parts.next_offsets[tp] = next_offset
            _low, high = self.consumer.get_watermark_offsets(
                RdTopicPartition(tp.topic, tp.partition), cached=True
            )
            if high >= 0:
                parts.high_watermarks[tp] = high
        return parts.build(self.config.topic)

    def _up_to_gap(
        self, tp: TopicPartition, records: Sequence[_Record]
    ) -> tuple[list[_Record], int]:
        """The records before the first skipped offset, and the offset to go on from."""
        expected = self._expected.get(tp, records[0].offset)
        taken, next_offset, seek = self.gaps.cut(tp, [r.offset for r in records], expected)
        if seek:
            self.consumer.seek(RdTopicPartition(tp.topic, tp.partition, next_offset))
        self._expected[tp] = next_offset
        return list(records[:taken]), next_offset

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit `offsets` in the sink's transaction, with what it produced since the last."""
        await self.sink.commit(offsets, self.consumer.consumer_group_metadata())

    async def committed(self, tp: TopicPartition) -> int | None:
        """The group's committed offset of `tp` (transactions: the last committed one)."""
        wanted = [RdTopicPartition(tp.topic, tp.partition)]
        [got] = await asyncio.to_thread(self._lookups.committed, wanted, CALL_TIMEOUT_S)
        offset: int = got.offset
        return offset if offset >= 0 else None

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Read `tp` from `offset` on (the assignment's start, inside `on_assigned`)."""
        if self._starts is not None:
            self._starts[tp] = offset
        else:
            self.consumer.seek(RdTopicPartition(tp.topic, tp.partition, offset))
        self._expected[tp] = offset

    async def seek_to_beginning(self, tp: TopicPartition) -> None:
        """Read `tp` from its first offset on."""
        self._expected.pop(tp, None)
        if self._starts is not None:
            self._starts[tp] = OFFSET_BEGINNING
        else:
            self.consumer.seek(RdTopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING))

    async def log_range(self, tp: TopicPartition) -> tuple[int, int]:
        """The partition's log start offset and its end, asked of the broker."""
        low, high = await asyncio.to_thread(
            self._lookups.get_watermark_offsets,
            RdTopicPartition(tp.topic, tp.partition),
            CALL_TIMEOUT_S,
            False,
        )
        return int(low), int(high)

    async def log_id(self, topic: str) -> str:
        """Always "": confluent-kafka's metadata carries no topic ids."""
        return ""

    async def close(self) -> None:
        """Leave the group (its revoke callback still runs the worker's `on_revoked`)."""
        try:
            await self._in_consumer_thread(self.consumer.close)
        finally:
            self._io.shutdown(wait=False)
            await asyncio.to_thread(self._lookups.close)


def open_dataplane(config: DataPlaneConfig) -> DataPlane:
    """The exactly-once data plane for `config` (call inside the running event loop)."""
    sink = TransactionalSink(config)
    return DataPlane(ConfluentSource(config, sink), sink, transactional=True)
