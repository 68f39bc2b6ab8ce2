"""TICKSERVE_EXACTLY_ONCE under a crash: one committed outcome per tick, the rest aborted.

Read as a read_committed consumer reads (`oracle.read_committed_log`, from the log's
transaction markers: the local broker does not hide aborted records itself).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from deploy.settings import Settings
from tests.faults import oracle
from tests.faults.harness import Publisher, Worker, market
from tests.helpers import Pipeline, fresh, run, unique

pytestmark = [pytest.mark.services, pytest.mark.timeout(900)]


def _signals_log(settings: Settings) -> oracle.CommittedLog:
    return run(
        oracle.read_committed_log(settings.bootstrap, settings.signals_topic, settings.partitions)
    )


def test_sigkill_under_exactly_once_leaves_one_committed_outcome_per_tick(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    """Killed mid-stream with a transaction open; the restart aborts it and reads on."""
    settings = fresh(
        pipeline.settings,
        snapshot_interval_s=0.2,
        max_batch=500,
        exactly_once=True,
        transactional_id=unique("txn"),  # one instance, restarted: the same id
    )
    ticks = market(pipeline, 6000)
    log = tmp_path / "worker.log"
    workers = [Worker(settings, log)]
    try:
        workers[0].wait_for('"msg":"worker consuming"')
        publisher = Publisher(settings, ticks, rate=2000)
        # a stream under way: transactions committed, and one open with records in it
        # (it may commit between this read and the kill: then none is left to abort)
        deadline = time.monotonic() + 60
        while (seen := _signals_log(settings)).open == 0 or len(seen.records) < 1000:
            assert time.monotonic() < deadline, f"none open in 60 s: {seen.open}"
            time.sleep(0.01)
        workers[0].kill()
        second = Worker(settings, log)
        workers.append(second)
        back = second.started
        second.wait_for('"msg":"worker consuming"')
        assert publisher.join() == len(ticks)
        result = oracle.answered(
            settings,
            expect_ticks=len(ticks),
            fault_end=back,
            committed_only=True,
            partitions=settings.partitions,
        )
    finally:
        for worker in workers:
            worker.stop()
    oracle.record(
        "SIGKILL of the worker with TICKSERVE_EXACTLY_ONCE (committed records only)",
        result,
        f"6,000 ticks at 2,000/s over 4 partitions, killed with a transaction open after"
        f" 1,000 committed signals; {result.aborted} records aborted by the restart",
    )
    # at least once, the restart would duplicate what the kill left uncommitted
    result.check(max_duplicates=0)
    assert result.signalled == len(ticks)
