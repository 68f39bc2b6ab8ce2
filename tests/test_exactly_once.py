"""The exactly-once plane's transactions on the real broker: commit, abort, fencing."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import TopicPartition
from confluent_kafka import Consumer
from confluent_kafka import TopicPartition as RdTopicPartition

from deploy.settings import Settings
from stream.kafka.base import DataPlaneConfig
from stream.kafka.clients import ensure_topics
from stream.kafka.confluent_io import TransactionalSink
from tests.faults.oracle import read_committed_log
from tests.helpers import run, unique
from tickserve.errors import TransactionFailed

pytestmark = pytest.mark.services


def _values(log_records: list[object]) -> list[bytes | None]:
    return [r.value for r in log_records]  # type: ignore[attr-defined]


def test_a_crashed_transaction_is_aborted_by_its_successor_and_the_zombie_is_fenced(
    stack_settings: Settings,
) -> None:
    """Records of a producer that never committed are aborted when its id starts again."""
    out, ticks = unique("eos-out"), unique("eos-in")
    run(ensure_topics(stack_settings.bootstrap, [out, ticks], 1))
    config = DataPlaneConfig(
        stack_settings.bootstrap, ticks, unique("g"), transactional_id=unique("txn")
    )
    group = Consumer({"bootstrap.servers": config.bootstrap, "group.id": config.group_id})
    metadata = group.consumer_group_metadata()
    tp = TopicPartition(ticks, 0)

    async def go() -> None:
        zombie = TransactionalSink(config)
        await zombie.start()
        await zombie.send_record(out, b"committed", b"k")
        await zombie.commit({tp: 1}, metadata)
        await zombie.send_record(out, b"in flight at the crash", b"k")
        await asyncio.to_thread(zombie.producer.flush, 10)  # on the broker, not committed
        successor = TransactionalSink(config)  # the restarted instance: the same id
        await successor.start()  # aborts the open transaction, fences the zombie
        await successor.send_record(out, b"after the restart", b"k")
        await successor.commit({tp: 2}, metadata)
        with pytest.raises(TransactionFailed, match="commit|fenced|Fenced"):
            await zombie.send_record(out, b"from the zombie", b"k")
            await zombie.commit({tp: 3}, metadata)
        await successor.close()

    try:
        run(go())
        [committed] = group.committed([RdTopicPartition(ticks, 0)], 10)
    finally:
        group.close()
    assert committed.offset == 2  # the zombie's offsets never landed
    log = run(read_committed_log(config.bootstrap, out, 1))
    assert _values(log.records) == [b"committed", b"after the restart"]
    assert log.aborted >= 1 and log.open == 0, log
