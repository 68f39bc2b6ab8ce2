"""The exactly-once plane's transactions on the real broker: commit, abort, fencing."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import TopicPartition
from confluent_kafka import Consumer, KafkaError, KafkaException
from confluent_kafka import TopicPartition as RdTopicPartition

from deploy.settings import Settings
from stream.kafka.base import DataPlaneConfig
from stream.kafka.clients import ensure_topics
from stream.kafka.confluent_io import COMMIT_RETRIES, TransactionalSink
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


class _Flaky:
    """Stands in for the producer's commit: fails with `errors` in turn, then commits."""

    def __init__(self, *errors: KafkaError) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self, timeout: float) -> None:
        self.calls += 1
        if self.errors:
            raise KafkaException(self.errors.pop(0))


def test_a_retriable_commit_error_is_retried_and_a_fatal_one_is_not() -> None:
    """A timed-out commit goes again (up to COMMIT_RETRIES); a fenced one ends at once."""
    timeout = KafkaError(KafkaError._TIMED_OUT, "timed out", retriable=True)
    fenced = KafkaError(KafkaError._FENCED, "fenced", fatal=True)
    config = DataPlaneConfig("127.0.0.1:1", "ticks", "g", transactional_id="t")

    async def commit(flaky: _Flaky) -> None:
        sink = TransactionalSink(config)  # no broker is asked before `start`
        try:
            sink.producer = type("P", (), {"commit_transaction": flaky})()  # type: ignore[assignment]
            await sink._commit()
        finally:
            sink._calls.shutdown(wait=False)

    once = _Flaky(timeout)
    run(commit(once))
    assert once.calls == 2

    always = _Flaky(*[timeout] * COMMIT_RETRIES)
    with pytest.raises(TransactionFailed) as failed:
        run(commit(always))
    assert always.calls == COMMIT_RETRIES and failed.value.retriable
    assert failed.value.step == "commit_transaction"

    gone = _Flaky(fenced)
    with pytest.raises(TransactionFailed) as failed:
        run(commit(gone))
    assert gone.calls == 1 and not failed.value.retriable and not failed.value.abortable
