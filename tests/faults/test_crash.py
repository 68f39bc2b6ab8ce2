"""Worker processes die or come and go under load: nothing lost, duplicates only as marked."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from stream.worker.commits import MAX_INFLIGHT_BATCHES
from tests.faults import oracle
from tests.faults.harness import InProcess, Publisher, Worker, market
from tests.helpers import Pipeline, fresh

pytestmark = [pytest.mark.services, pytest.mark.timeout(900)]


def test_sigkill_mid_batch_and_during_restore(pipeline: Pipeline, tmp_path: Path) -> None:
    """Killed under a steady stream, then killed again while restoring; a third run finishes."""
    settings = fresh(pipeline.settings, snapshot_interval_s=0.2, max_batch=500)
    ticks = market(pipeline, 6000)
    log = tmp_path / "worker.log"
    workers = [Worker(settings, log)]
    first = workers[0]
    try:
        first.wait_for('"msg":"worker consuming"')
        publisher = Publisher(settings, ticks, rate=2000)
        time.sleep(1.5)  # a stream under way: batches in flight, snapshots written
        first.kill()
        second = Worker(settings, log)
        workers.append(second)
        second.wait_for('"msg":"partition restored"')  # the first partition back, not all
        second.kill()
        third = Worker(settings, log)
        workers.append(third)
        back = third.started  # recovery counts the restart: imports, join, restore, replay
        third.wait_for('"msg":"worker consuming"')
        assert publisher.join() == len(ticks)
        result = oracle.answered(settings, expect_ticks=len(ticks), fault_end=back)
    finally:
        for worker in workers:
            worker.stop()
    oracle.record(
        "SIGKILL of the worker mid-batch, then again during restore",
        result,
        "6,000 ticks at 2,000/s over 4 partitions; recovery from the third process's start",
    )
    # a crash replays what was not committed: at most the batches in flight, marked
    result.check(max_duplicates=4 * 500 * 2)
    assert result.signalled == len(ticks)


def test_a_second_worker_joins_and_leaves_under_load(pipeline: Pipeline) -> None:
    """Two consumer-group rebalances while ticks keep arriving: each commits before it moves."""
    settings = fresh(pipeline.settings, snapshot_interval_s=0.2, max_batch=500)
    ticks = market(pipeline, 20_000)
    first = InProcess(settings)
    second = None
    try:
        first.wait_assigned()
        publisher = Publisher(settings, ticks, rate=500)
        time.sleep(1.0)
        second = InProcess(settings)  # joins while the stream runs
        second.wait_assigned()
        time.sleep(2.0)
        assert second.stop()  # leaves while the stream runs
        back = time.time()
        time.sleep(2.0)  # the stream goes on with the first worker alone
        publisher.stopped.set()
        sent = publisher.join()
        result = oracle.answered(settings, expect_ticks=sent, fault_end=back)
    finally:
        stopped = first.stop()
        if second is not None and second.alive:
            second.stop()
    oracle.record(
        "A second worker joins and leaves under load",
        result,
        f"{sent:,} ticks at 500/s; recovery from the second worker's exit",
    )
    # each rebalance commits what was acknowledged before partitions move; duplicates seen
    # here come from batches still in flight then (at most MAX_INFLIGHT_BATCHES + 1 each)
    result.check(max_duplicates=2 * (MAX_INFLIGHT_BATCHES + 1) * 500)
    assert stopped
    assert second.worker.processed > 0  # it did take partitions over
