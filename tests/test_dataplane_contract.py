"""One contract for the data planes (wire_io, aiokafka_io, confluent_io), on the real broker."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from aiokafka import TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from deploy.settings import Settings
from deploy.stack import LocalStack, free_port
from stream.kafka import aiokafka_io, confluent_io, wire_io
from stream.kafka.base import DataPlane, DataPlaneConfig, OpenDataPlane, TickSource
from stream.kafka.clients import ensure_topics, make_producer
from stream.kafka.fetched import Fetched
from tests.helpers import read_topic, run, unique

pytestmark = pytest.mark.services

PLANES = pytest.mark.parametrize(
    "open_dataplane",
    [wire_io.open_dataplane, aiokafka_io.open_dataplane, confluent_io.open_dataplane],
    ids=["wire", "aiokafka", "exactly-once"],
)
# a transaction that fails ends the worker (stream.kafka.confluent_io): no single record
# outlives its producer's state lost in a broker restart there
AT_LEAST_ONCE_PLANES = pytest.mark.parametrize(
    "open_dataplane",
    [wire_io.open_dataplane, aiokafka_io.open_dataplane],
    ids=["wire", "aiokafka"],
)
PARTITIONS = 2


class Recorder:
    """A `Rebalance` that remembers what it heard and may move positions on assignment."""

    def __init__(self, source: TickSource | None = None, seek_to: int | None = None) -> None:
        self.source = source
        self.seek_to = seek_to
        self.assigned: set[TopicPartition] = set()
        self.revoked: set[TopicPartition] = set()

    async def on_assigned(self, partitions: set[TopicPartition]) -> None:
        self.assigned |= partitions
        if self.source is not None and self.seek_to is not None:
            for tp in partitions:
                self.source.seek(tp, self.seek_to)

    async def on_revoked(self, partitions: set[TopicPartition]) -> None:
        self.revoked |= partitions


def _topic(settings: Settings, prefix: str) -> str:
    topic = unique(prefix)
    run(ensure_topics(settings.bootstrap, [topic], PARTITIONS))
    return topic


def _values(partition: int, n: int) -> list[bytes]:
    return [b"p%d-%d" % (partition, i) for i in range(n)]


async def _produce(bootstrap: str, topic: str, per_partition: int) -> None:
    producer = make_producer(bootstrap)
    await producer.start()
    try:
        acks = [
            await producer.send(topic, value, key=b"k%d" % p, partition=p)
            for p in range(PARTITIONS)
            for value in _values(p, per_partition)
        ]
        await asyncio.gather(*acks)
    finally:
        await producer.stop()


async def _poll_until(source: TickSource, n: int, timeout_s: float = 30) -> list[Fetched]:
    """Poll until `n` records came back (or the timeout: the caller checks the count)."""
    out, seen = [], 0
    deadline = time.monotonic() + timeout_s
    while seen < n and time.monotonic() < deadline:
        fetched = await source.poll(200)
        if len(fetched):
            out.append(fetched)
            seen += len(fetched)
    return out


def _by_partition(
    batches: list[Fetched],
) -> dict[int, list[tuple[int, bytes | None, bytes | None]]]:
    """(offset, key, value) per partition, in the order handed out."""
    out: dict[int, list[tuple[int, bytes | None, bytes | None]]] = {}
    for fetched in batches:
        for i in range(len(fetched)):
            row = (int(fetched.offset[i]), fetched.key(i), fetched.value(i))
            out.setdefault(int(fetched.partition[i]), []).append(row)
    return out


async def _started(
    open_dataplane: OpenDataPlane, config: DataPlaneConfig, rebalance: Recorder
) -> DataPlane:
    plane = open_dataplane(config)
    await plane.sink.start()
    rebalance.source = plane.source
    await plane.source.start(rebalance)
    await plane.source.wait_assigned()
    return plane


async def _close(plane: DataPlane) -> None:
    await plane.source.close()
    await plane.sink.close()


@PLANES
def test_records_come_back_as_columns_in_order_per_partition(
    stack_settings: Settings, open_dataplane: OpenDataPlane
) -> None:
    topic = _topic(stack_settings, "contract-read")
    run(_produce(stack_settings.bootstrap, topic, 50))
    config = DataPlaneConfig(stack_settings.bootstrap, topic, unique("g"))

    async def go() -> tuple[dict[int, list[tuple[int, bytes | None, bytes | None]]], Recorder]:
        rebalance = Recorder()
        plane = await _started(open_dataplane, config, rebalance)
        try:
            return _by_partition(await _poll_until(plane.source, 2 * 50)), rebalance
        finally:
            await _close(plane)

    got, rebalance = run(go())  # type: ignore[misc]
    assert rebalance.assigned == {TopicPartition(topic, p) for p in range(PARTITIONS)}
    for p in range(PARTITIONS):
        want = [(i, b"k%d" % p, v) for i, v in enumerate(_values(p, 50))]
        assert got[p] == want


@PLANES
def test_a_new_source_resumes_from_the_committed_offset(
    stack_settings: Settings, open_dataplane: OpenDataPlane
) -> None:
    topic = _topic(stack_settings, "contract-commit")
    run(_produce(stack_settings.bootstrap, topic, 20))
    config = DataPlaneConfig(stack_settings.bootstrap, topic, unique("g"))
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]

    async def first() -> dict[TopicPartition, int | None]:
        plane = await _started(open_dataplane, config, Recorder())
        try:
            await _poll_until(plane.source, 2 * 20)
            await plane.source.commit({tps[0]: 7, tps[1]: 12})
            return {tp: await plane.source.committed(tp) for tp in tps}
        finally:
            await _close(plane)

    async def second() -> dict[int, list[tuple[int, bytes | None, bytes | None]]]:
        plane = await _started(open_dataplane, config, Recorder())
        try:
            return _by_partition(await _poll_until(plane.source, (20 - 7) + (20 - 12)))
        finally:
            await _close(plane)

    assert run(first()) == {tps[0]: 7, tps[1]: 12}
    got = run(second())
    assert [offset for offset, _, _ in got[0]] == list(range(7, 20))  # type: ignore[index]
    assert [offset for offset, _, _ in got[1]] == list(range(12, 20))  # type: ignore[index]


@PLANES
def test_a_seek_on_assignment_moves_the_position(
    stack_settings: Settings, open_dataplane: OpenDataPlane
) -> None:
    topic = _topic(stack_settings, "contract-seek")
    run(_produce(stack_settings.bootstrap, topic, 10))
    config = DataPlaneConfig(stack_settings.bootstrap, topic, unique("g"))

    async def go() -> dict[int, list[tuple[int, bytes | None, bytes | None]]]:
        plane = await _started(open_dataplane, config, Recorder(seek_to=6))
        try:
            return _by_partition(await _poll_until(plane.source, 2 * 4))
        finally:
            await _close(plane)

    got = run(go())
    for p in range(PARTITIONS):
        assert [offset for offset, _, _ in got[p]] == [6, 7, 8, 9]  # type: ignore[index]


@PLANES
def test_sink_acks_resolve_and_records_land_in_order(
    stack_settings: Settings, open_dataplane: OpenDataPlane
) -> None:
    topic = _topic(stack_settings, "contract-sink")
    dlq = _topic(stack_settings, "contract-single")
    config = DataPlaneConfig(stack_settings.bootstrap, _topic(stack_settings, "in"), unique("g"))

    async def go() -> int:
        plane = await _started(open_dataplane, config, Recorder())
        try:
            sink = plane.sink
            partitions = await sink.partitions(topic)
            acks = []
            for c in range(3):
                batches = []
                for p in range(PARTITIONS):
                    builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1 << 20)
                    for i in range(10):
                        value = b"%d-%d-%d" % (p, c, i)
                        builder.append(i, timestamp=1, key=b"k", value=value, headers=[])
                    batches.append((p, bytes(builder.build()), 10))
                acks += await sink.send(topic, batches)
            acks.append(await sink.send_record(dlq, b"bad", b"k", [("reason", b"why")]))
            if plane.transactional:  # the records are delivered by the commit
                await plane.source.commit({})
            await asyncio.wait_for(asyncio.gather(*acks), 30)
            assert all(ack.done() and ack.exception() is None for ack in acks)
            return partitions
        finally:
            await _close(plane)

    assert run(go()) == PARTITIONS
    records = run(read_topic(stack_settings.bootstrap, topic, PARTITIONS, 60))
    for p in range(PARTITIONS):
        values = [r.value for r in records if r.partition == p]  # type: ignore[attr-defined]
        assert values == [b"%d-%d-%d" % (p, c, i) for c in range(3) for i in range(10)]
    [single] = run(read_topic(stack_settings.bootstrap, dlq, PARTITIONS, 1))  # type: ignore[misc]
    assert (single.key, single.value, dict(single.headers)) == (b"k", b"bad", {"reason": b"why"})
    every = list(range(PARTITIONS))
    assert single.partition == DefaultPartitioner()(b"k", every, every)  # as a keyed send


@AT_LEAST_ONCE_PLANES
def test_a_single_record_outlives_its_topic_lost_in_a_broker_restart(
    stack_settings: Settings, open_dataplane: OpenDataPlane, tmp_path: Path
) -> None:
    """The broker comes back empty and only the subscribed topic is made again.

    The wire producer then knows no leader for the single records' topic and gives the
    record up; it goes again through aiokafka's producer, which asks for the topic with
    creation allowed (the local broker acks a Produce to a topic it lacks and keeps
    nothing, so what lands after the restart is checked on a topic that exists).
    """
    own = stack_settings.model_copy(
        update={"broker_port": free_port(), "state_dir": tmp_path / "state"}
    )
    stack = LocalStack(own)
    broker = stack.start_broker()
    single, later = unique("contract-single"), unique("contract-later")
    config = DataPlaneConfig(own.bootstrap, unique("in"), unique("g"))

    async def go() -> None:
        await ensure_topics(own.bootstrap, [config.topic, single], PARTITIONS)
        plane = await _started(open_dataplane, config, Recorder())
        try:
            await asyncio.wait_for(await plane.sink.send_record(single, b"one", b"k"), 30)
            assert broker.pid is not None
            os.kill(broker.pid, signal.SIGKILL)
            stack.down(("broker",))
            stack.start_broker()
            await ensure_topics(own.bootstrap, [config.topic, later], PARTITIONS)
            await plane.sink.partitions(config.topic)  # leaders asked again, `single` unknown
            ack = await plane.sink.send_record(single, b"two", b"k")
            await asyncio.wait_for(ack, 60)  # raises what the send raised
            ack = await plane.sink.send_record(later, b"three", b"k")
            await asyncio.wait_for(ack, 30)
        finally:
            await _close(plane)

    try:
        run(go())
        [record] = run(read_topic(own.bootstrap, later, PARTITIONS, 1))  # type: ignore[misc]
        assert (record.key, record.value) == (b"k", b"three")
    finally:
        stack.down(("broker",))
