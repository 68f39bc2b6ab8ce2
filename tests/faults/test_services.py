"""A service the worker leans on goes away under load: Redis down, then back empty."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from deploy.stack import LocalStack, free_port
from tests.faults import oracle
from tests.faults.harness import InProcess, Publisher, market
from tests.helpers import Pipeline, fresh

pytestmark = [pytest.mark.services, pytest.mark.timeout(600)]

# as long as the operator's probe of issue 22 held it down
REDIS_DOWN_S = 30.0


def test_redis_down_then_back_empty(pipeline: Pipeline, tmp_path: Path) -> None:
    """Snapshots and the online store fail for a while; signals must not stop or double."""
    # its own port, and a state dir of its own for the process's pid and log only
    own = pipeline.settings.model_copy(update={"valkey_port": free_port()})
    stack = LocalStack(own.model_copy(update={"state_dir": tmp_path / "state"}))
    redis = stack.start_redis()
    worker = None
    try:
        settings = fresh(own, snapshot_interval_s=0.2, max_batch=500)
        ticks = market(pipeline, 40_000)
        worker = InProcess(settings, online_store=True)
        worker.wait_assigned()
        publisher = Publisher(settings, ticks, rate=500)
        time.sleep(1.0)
        assert redis.pid is not None
        os.kill(redis.pid, signal.SIGKILL)
        stack.down(("redis",))  # reaps it
        time.sleep(2.0)
        early = worker.worker.processed
        time.sleep(REDIS_DOWN_S - 2.0)
        processed_while_down = worker.worker.processed - early
        stack.start_redis()  # empty: nothing persisted
        back = time.time()
        time.sleep(2.0)
        publisher.stopped.set()
        sent = publisher.join()
        result = oracle.answered(settings, expect_ticks=sent, fault_end=back)
        oracle.record(
            f"Redis (Valkey) SIGKILLed for {REDIS_DOWN_S:.0f} s, back empty",
            result,
            f"{sent:,} ticks at 500/s; {processed_while_down:,} processed in the last "
            f"{REDIS_DOWN_S - 2.0:.0f} s of the outage",
        )
        alive = worker.alive
    finally:
        try:
            stopped = worker is None or worker.stop()
        finally:
            stack.down(("redis",))
    assert alive and stopped
    # the stream kept going while Redis was down, not only after it came back
    assert processed_while_down > 0.5 * 500 * (REDIS_DOWN_S - 2.0), processed_while_down
    result.check(max_duplicates=sent)
