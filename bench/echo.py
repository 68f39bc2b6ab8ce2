"""The broker floor: consume ticks and produce the same bytes, nothing else.

Same consumer and producer settings as the worker, the same consume path
(`stream.kafka.aiokafka_adapter.drain`: record batches parsed as columns) and the same produce
shape (one record batch per partition, commit after the acks), so the difference
between this and `tickserve serve` is tickserve's own work.

Run: python -m bench.echo --bootstrap HOST:PORT --source T --sink T2 --group G
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from typing import Any

from aiokafka.record.default_records import DefaultRecordBatchBuilder

from stream.kafka import wire
from stream.kafka.aiokafka_adapter import drain, install
from stream.kafka.clients import make_consumer, make_producer, start_client
from stream.kafka.fetched import Fetched, GapRetries
from stream.kafka.wire import WireFetcher, WireProducer
from tickserve.sched import realtime_priority, time_slice


async def echo(args: argparse.Namespace) -> None:
    """Forward until SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    realtime_priority(args.realtime_priority)  # as the worker does with the same settings
    time_slice(args.sched_slice_us)
    wire.warm_up()
    install()
    consumer = make_consumer(args.bootstrap, args.group, [args.source], args.fetch_max_wait_ms,
                             args.max_batch)  # fmt: skip
    producer = make_producer(args.bootstrap, args.linger_ms)
    await start_client(producer, args.bootstrap)
    await start_client(consumer, args.bootstrap)
    partitions = len(await producer.partitions_for(args.sink))
    while not consumer.assignment():
        await asyncio.sleep(0.05)
    print("assigned", flush=True)
    gaps = GapRetries()  # as the worker does
    fetcher = WireFetcher(consumer, args.source, args.fetch_max_wait_ms, gaps=gaps,
                          one_write=args.one_write)  # fmt: skip
    sender = WireProducer(producer, share=fetcher if args.one_write else None)
    try:
        while not stop.is_set():
            if args.wire:
                fetched = await fetcher.poll(100)
            else:
                fetched = await drain(consumer, args.source, 100, gaps)
            if not len(fetched):
                continue
            now_ms = time.time_ns() // 1_000_000
            if args.wire:
                acks = sender.send(args.sink, _record_batches(fetched, partitions, now_ms))
            else:
                acks = await _send_via_aiokafka(producer, args.sink, fetched, partitions, now_ms)
            await asyncio.gather(*acks)
            await consumer.commit(fetched.next_offsets)
    finally:
        await fetcher.close()
        await sender.close()
        await consumer.stop()
        await producer.stop()


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
        builder.append(counts[p], timestamp=now_ms, key=fetched.key(i), value=fetched.value(i),
                       headers=[])  # fmt: skip
        counts[p] += 1
    return [(p, bytes(b.build()), counts[p]) for p, b in builders.items()]


async def _send_via_aiokafka(
    producer: Any, topic: str, fetched: Fetched, partitions: int, now_ms: int
) -> list[Any]:
    acks = []
    builders: dict[int, Any] = {}
    for i, partition in enumerate(fetched.partition.tolist()):
        p = partition % partitions
        key, value = fetched.key(i), fetched.value(i)
        builder = builders.get(p)
        if builder is None:
            builder = builders[p] = producer.create_batch()
        if builder.append(timestamp=now_ms, key=key, value=value) is None:
            builder.close()
            acks.append(await producer.send_batch(builder, topic, partition=p))
            builder = builders[p] = producer.create_batch()
            builder.append(timestamp=now_ms, key=key, value=value)
    for p, builder in builders.items():
        # closed: sent at once, not held `linger_ms` for appends that never come
        builder.close()
        acks.append(await producer.send_batch(builder, topic, partition=p))
    return acks


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--sink", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--fetch-max-wait-ms", type=int, default=20)
    parser.add_argument("--linger-ms", type=int, default=5)
    parser.add_argument("--max-batch", type=int, default=2000)
    parser.add_argument("--realtime-priority", type=int, default=0)
    parser.add_argument("--sched-slice-us", type=int, default=0, help="as TICKSERVE_SCHED_SLICE_US")
    parser.add_argument("--one-write", action=argparse.BooleanOptionalAction, default=True,
                        help="as TICKSERVE_ONE_WRITE")  # fmt: skip
    parser.add_argument(
        "--wire", action=argparse.BooleanOptionalAction, default=True,
        help="stream.kafka.wire's data plane, as the worker; --no-wire: aiokafka's",
    )  # fmt: skip
    import uvloop

    uvloop.run(echo(parser.parse_args()))


if __name__ == "__main__":
    main()
