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


def _committed_signals(settings: Settings) -> int:
    log = run(
        oracle.read_committed_log(settings.bootstrap, settings.signals_topic, settings.partitions)
    )
    return len(log.records)


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
        # a stream under way: transactions committed, one open
        deadline = time.monotonic() + 60
        while _committed_signals(settings) < 1000:
            assert time.monotonic() < deadline, "no signals committed within 60 s"
            time.sleep(0.05)
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
        f"6,000 ticks at 2,000/s over 4 partitions, killed after 1,000 committed signals;"
        f" {result.aborted} records aborted (a kill during a commit leaves none open)",
    )
    # at least once, the restart would duplicate what the kill left uncommitted
    result.check(max_duplicates=0)
    assert result.signalled == len(ticks)
