"""The log under a running worker goes away: topic recreated, broker restarted empty."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from deploy.stack import LocalStack, free_port
from stream.ingest.feed import publish
from stream.kafka.clients import ensure_topics
from tests.faults import oracle
from tests.faults.harness import InProcess, market
from tests.helpers import Pipeline, fresh, run

pytestmark = [pytest.mark.services, pytest.mark.timeout(600)]


async def _recreate(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])
    finally:
        await admin.close()
    for _ in range(50):  # the broker may take a moment to let the name go
        try:
            await ensure_topics(bootstrap, [topic], partitions)
            return
        except Exception:
            await asyncio.sleep(0.1)
    await ensure_topics(bootstrap, [topic], partitions)


def test_ticks_topic_deleted_and_recreated_under_a_running_worker(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    settings = fresh(pipeline.settings, snapshot_interval_s=0.2, max_batch=500)
    before, after = market(pipeline, 2000, tag="a"), market(pipeline, 2000, tag="b", start=500)
    worker = InProcess(settings)
    try:
        run(publish(before, settings.bootstrap, settings.ticks_topic))
        worker.wait_assigned()
        first = oracle.answered(settings, expect_ticks=len(before))
        first.check()  # all answered before the fault (the oracle waits for it)
        old_log = run(oracle.read_log(settings.bootstrap, settings.ticks_topic))
        time.sleep(0.5)  # a snapshot and a commit past the new log's end
        run(_recreate(settings.bootstrap, settings.ticks_topic, settings.partitions))
        back = time.time()
        run(publish(after, settings.bootstrap, settings.ticks_topic))
        result = oracle.answered(
            settings, expect_ticks=len(after), fault_end=back, earlier=[old_log]
        )
        oracle.record(
            "Ticks topic deleted and recreated under the running worker",
            result,
            "2,000 ticks before, 2,000 into the new topic",
        )
        alive = worker.alive
    finally:
        stopped = worker.stop()
    assert alive and stopped
    result.check()


def test_broker_killed_and_restarted_with_empty_storage(pipeline: Pipeline, tmp_path: Path) -> None:
    """A broker of its own (the session's must stay up): SIGKILL, then a fresh, empty one."""
    # its own port, and a state dir of its own for the process's pid and log only
    own = pipeline.settings.model_copy(update={"broker_port": free_port()})
    stack = LocalStack(own.model_copy(update={"state_dir": tmp_path / "state"}))
    broker = stack.start_broker()
    worker = None
    try:
        settings = fresh(own, snapshot_interval_s=0.2, max_batch=500)
        before, after = market(pipeline, 2000, tag="a"), market(pipeline, 2000, tag="b", start=500)
        worker = InProcess(settings)
        run(publish(before, settings.bootstrap, settings.ticks_topic))
        worker.wait_assigned()
        oracle.answered(settings, expect_ticks=len(before)).check()
        time.sleep(0.5)  # a snapshot and a commit past the new log's end

        assert broker.pid is not None
        os.kill(broker.pid, signal.SIGKILL)
        stack.down(("broker",))  # reaps it
        time.sleep(2.0)  # the worker sees the broker gone
        stack.start_broker()
        back = time.time()
        run(
            ensure_topics(
                settings.bootstrap,
                [settings.ticks_topic, settings.signals_topic, settings.dlq_topic],
                settings.partitions,
            )
        )
        run(publish(after, settings.bootstrap, settings.ticks_topic))
        result = oracle.answered(settings, expect_ticks=len(after), fault_end=back)
        oracle.record(
            "Broker SIGKILLed and restarted with empty storage",
            result,
            "own broker; 2,000 ticks before (gone with the broker), 2,000 after",
        )
        alive = worker.alive
    finally:
        try:
            stopped = worker is None or worker.stop()
        finally:
            stack.down(("broker",))
    assert alive
    assert stopped, "the worker did not stop within 60 s of its stop event"
    # The group re-forms a few seconds after the restart and the worker checks what it
    # committed meanwhile against the log's end: the local broker's ListOffsets answers
    # the last batch's first offset + 1 (BROKER.md, 4), so a committed offset of this new
    # log can look past its end and that partition is read again: repeats, each marked by
    # its (partition, offset), at most a partition's share of the new log
    result.check(max_duplicates=len(after))


def test_broker_restarted_empty_and_refilled_while_the_worker_was_down(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    """The new log holds as many records per partition as the old one did.

    The worker's snapshots (taken at shutdown) point at the old log's ends, which are
    the new log's ends too: only the topic's id tells the two logs apart. Read on from
    there, the worker would wait at the end of the new log and signal none of it.
    """
    own = pipeline.settings.model_copy(update={"broker_port": free_port()})
    stack = LocalStack(own.model_copy(update={"state_dir": tmp_path / "state"}))
    stack.start_broker()
    try:
        settings = fresh(own, snapshot_interval_s=0.2, max_batch=500)
        # the same symbols and counts: each partition's new log ends where the old one did
        before, after = market(pipeline, 2000, tag="a"), market(pipeline, 2000, tag="b", start=500)
        worker = InProcess(settings)
        try:
            run(publish(before, settings.bootstrap, settings.ticks_topic))
            worker.wait_assigned()
            oracle.answered(settings, expect_ticks=len(before)).check()
        finally:
            assert worker.stop(), "the worker did not stop within 60 s of its stop event"

        stack.down(("broker",))
        stack.start_broker()
        run(
            ensure_topics(
                settings.bootstrap,
                [settings.ticks_topic, settings.signals_topic, settings.dlq_topic],
                settings.partitions,
            )
        )
        # each symbol's last tick alone: the local broker's ListOffsets answers the last
        # batch's first offset + 1 (BROKER.md, 4), so the log's end reads true, as Kafka's
        run(publish(after[:-4], settings.bootstrap, settings.ticks_topic))
        for tick in after[-4:]:
            run(publish([tick], settings.bootstrap, settings.ticks_topic))
        back = time.time()
        worker = InProcess(settings)
        try:
            result = oracle.answered(settings, expect_ticks=len(after), fault_end=back)
            oracle.record(
                "Broker restarted empty and refilled to the same offsets while the worker was down",
                result,
                "own broker; 2,000 ticks before, 2,000 after: the same offsets per partition",
            )
            alive = worker.alive
        finally:
            stopped = worker.stop()
    finally:
        stack.down(("broker",))
    assert alive and stopped
    result.check()
