"""Archiver throughput: ticks/s from the first fetched batch to the last commit.

Publishes N synthetic ticks to a fresh broker first, then archives them into the
embedded ClickHouse engine; the group join and the idle exit are not counted.
Run: python -m bench.archive_rate [--ticks 300000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from deploy.settings import Settings
from deploy.stack import LocalStack, free_port
from stream.ingest.archive import ArchiveCounts, ArchiverConfig, ClickHouseArchive, run_archiver
from stream.ingest.feed import SyntheticMarket, publish
from stream.kafka.clients import ensure_topics


def main() -> None:
    """Print ticks/s of one archiver run."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ticks", type=int, default=300_000)
    parser.add_argument("--symbols", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(state_dir=Path(tmp), broker_port=free_port(), redis_url=None)
        stack = LocalStack(settings)
        stack.start_broker()
        try:
            asyncio.run(ensure_topics(settings.bootstrap, ["ticks"], settings.partitions))
            ticks = SyntheticMarket(symbols=args.symbols, seed=3).ticks(args.ticks)
            asyncio.run(publish(ticks, settings.bootstrap, "ticks"))
            archive = ClickHouseArchive.open(settings.clickhouse)
            counts = ArchiveCounts()
            config = ArchiverConfig(settings.bootstrap, "ticks", "bench-archive")
            asyncio.run(run_archiver(archive, config, asyncio.Event(), 2.0, counts))
        finally:
            stack.down()
    assert counts.first_batch_s is not None and counts.last_commit_s is not None
    elapsed = counts.last_commit_s - counts.first_batch_s
    print(
        f"archive: {counts.ticks} ticks in {elapsed:.2f} s = {counts.ticks / elapsed:,.0f} ticks/s"
    )


if __name__ == "__main__":
    main()
