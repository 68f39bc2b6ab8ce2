"""ClickHouse fails the archiver's inserts for a while: no archived tick lost or doubled after."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.exceptions import OperationalError

from stream.ingest.archive import ArchiveCounts, ArchiverConfig, ClickHouseArchive, run_archiver
from tests.faults import oracle
from tests.faults.harness import Publisher, market
from tests.helpers import Pipeline, fresh, run, unique
from tickserve.errors import ArchiveError

pytestmark = [pytest.mark.services, pytest.mark.timeout(600)]


class Outage:
    """The archive's ClickHouse client, refusing every insert while `down` is set.

    The embedded engine lives inside the test process and cannot be stopped alone, so
    the outage is injected where a ClickHouse server's would surface: the client's
    insert raises the driver's own connection error.
    """

    def __init__(self, client: Any) -> None:
        """Wrap `client`; up until `down` is set."""
        self.client = client
        self.down = threading.Event()
        self.refused = 0

    def insert(self, *args: Any, **kwargs: Any) -> Any:
        """Insert, or fail as an unreachable server does."""
        if self.down.is_set():
            self.refused += 1
            raise OperationalError("connection refused (injected outage)")
        return self.client.insert(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def test_clickhouse_down_while_the_archiver_runs(pipeline: Pipeline, tmp_path: Path) -> None:
    """The archiver stops on the failed insert (nothing committed) and a restart catches up."""
    tag = unique("arch") + "-"
    settings = fresh(pipeline.settings, archive_group_id=unique("archive"))
    ticks = market(pipeline, 4000, tag=tag)
    base = ClickHouseArchive.open(settings.clickhouse)
    outage = Outage(base.client)
    archive = ClickHouseArchive(outage)
    config = ArchiverConfig(
        settings.bootstrap, settings.ticks_topic, settings.archive_group_id, max_batch=500
    )
    publisher = Publisher(settings, ticks, rate=1000)

    async def first_run() -> str:
        stop = asyncio.Event()
        task = asyncio.create_task(run_archiver(archive, config, stop))
        await asyncio.sleep(2.0)  # some batches archived and committed
        outage.down.set()
        try:
            await asyncio.wait_for(task, 30)
        except ArchiveError as exc:
            return str(exc)
        return "archiver returned without an error"

    error = run(first_run())
    assert "injected outage" in error, error
    time.sleep(2.0)  # still down: ticks pile up in the topic
    outage.down.clear()
    back = time.monotonic()
    assert publisher.join() == len(ticks)
    counts = ArchiveCounts()
    run(run_archiver(archive, config, asyncio.Event(), idle_exit_s=3.0, counts=counts))
    assert counts.last_commit_s is not None

    log = run(oracle.read_log(settings.bootstrap, settings.ticks_topic))
    query = (
        "SELECT kafka_partition, kafka_offset FROM ticks {final} "
        "WHERE startsWith(trade_id, {{tag:String}})"
    )
    rows = base.client.query_np(query.format(final=""), parameters={"tag": tag})
    final = base.client.query_np(query.format(final="FINAL"), parameters={"tag": tag})
    result = oracle.archived(
        log,
        [tuple(r) for r in final.tolist()],
        [tuple(r) for r in rows.tolist()],
        counts.last_commit_s - back,
    )
    oracle.record(
        "ClickHouse refusing inserts while the archiver runs",
        result,
        f"{len(ticks):,} ticks at 1,000/s; {outage.refused} insert(s) refused; "
        "duplicates: rows inserted twice (a replayed batch), one after FINAL; "
        "recovery: outage end to the archiver caught up",
    )
    assert len(log) == len(ticks)
    result.check(max_duplicates=len(ticks))  # a replayed batch collapses under FINAL
