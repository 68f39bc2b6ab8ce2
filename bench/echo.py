"""The broker floor: consume ticks and produce the same bytes, nothing else.

The same data plane as the worker (`stream.kafka.wire_io`, or `stream.kafka.aiokafka_io`
with --no-wire: the same clients, settings and columnar fetch) and the same produce
shape (one record batch per partition, commit after the acks), so the difference
between this and `tickserve serve` is tickserve's own work.

Run: python -m bench.echo --bootstrap HOST:PORT --source T --sink T2 --group G
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time

from aiokafka import TopicPartition
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from bench.floor_args import floor_parser
from deploy.settings import load_settings
from stream.kafka import aiokafka_io, wire_io
from stream.kafka.base import DataPlaneConfig
from stream.kafka.fetched import Fetched
from tickserve.sched import realtime_priority


class _NoRebalance:
    """The floor keeps no state: nothing to do when partitions move."""

    async def on_assigned(self, partitions: set[TopicPartition]) -> None:
        """Nothing to restore."""

    async def on_revoked(self, partitions: set[TopicPartition]) -> None:
        """Nothing to snapshot."""


async def echo(args: argparse.Namespace) -> None:
    """Forward until SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    realtime_priority(args.realtime_priority)  # as the worker does with the same settings
    config = DataPlaneConfig(
        args.bootstrap,
        args.source,
        args.group,
        args.fetch_max_wait_ms,
        args.max_batch,
        args.linger_ms,
        load_settings().kafka_security,  # TICKSERVE_KAFKA_*, as the worker reads them
    )
    plane = (wire_io if args.wire else aiokafka_io).open_dataplane(config)
    source, sink = plane.source, plane.sink
    await sink.start()
    await source.start(_NoRebalance())
    try:
        partitions = await sink.partitions(args.sink)
        await source.wait_assigned()
        print("assigned", flush=True)
        while not stop.is_set():
            fetched = await source.poll(100)
            if not len(fetched):
                continue
            now_ms = time.time_ns() // 1_000_000
            acks = await sink.send(args.sink, _record_batches(fetched, partitions, now_ms))
            await asyncio.gather(*acks)
            await source.commit(fetched.next_offsets)
    finally:
        await source.close()
        await sink.close()


def _record_batches(fetched: Fetched, partitions: int, now_ms: int) -> list[tuple[int, bytes, int]]:
    """The fetched records as one v2 record batch per output partition."""
    builders: dict[int, DefaultRecordBatchBuilder] = {}
    counts: dict[int, int] = {}
    for i, partition in enumerate(fetched.partition.tolist()):
        p = partition % partitions
        builder = builders.get(p)
        if builder is None:
            builder = builders[p] = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1 << 30)
            counts[p] = 0
        builder.append(
            counts[p], timestamp=now_ms, key=fetched.key(i), value=fetched.value(i), headers=[]
        )
        counts[p] += 1
    return [(p, bytes(b.build()), counts[p]) for p, b in builders.items()]


def main() -> None:
    """Entry point."""
    parser = floor_parser(__doc__)
    parser.add_argument("--realtime-priority", type=int, default=0)
    parser.add_argument(
        "--wire",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stream.kafka.wire's data plane, as the worker; --no-wire: aiokafka's",
    )
    import uvloop

    uvloop.run(echo(parser.parse_args()))


if __name__ == "__main__":
    main()
