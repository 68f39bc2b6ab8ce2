"""The broker floor: consume ticks and produce the same bytes, nothing else.

Same consumer and producer settings as the worker, the same consume path
(`stream.fetch.drain`: record batches parsed as columns) and the same produce
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

from stream.fetch import GapRetries, drain, install
from stream.kafka import make_consumer, make_producer, start_client


async def echo(args: argparse.Namespace) -> None:
    """Forward until SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
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
    try:
        while not stop.is_set():
            fetched = await drain(consumer, args.source, 100, gaps)
            if not len(fetched):
                continue
            acks = []
            now_ms = time.time_ns() // 1_000_000
            builders: dict[int, Any] = {}
            for i, partition in enumerate(fetched.partition.tolist()):
                p = partition % partitions
                key, value = fetched.key(i), fetched.value(i)
                builder = builders.get(p)
                if builder is None:
                    builder = builders[p] = producer.create_batch()
                if builder.append(timestamp=now_ms, key=key, value=value) is None:
                    builder.close()
                    acks.append(await producer.send_batch(builder, args.sink, partition=p))
                    builder = builders[p] = producer.create_batch()
                    builder.append(timestamp=now_ms, key=key, value=value)
            for p, builder in builders.items():
                # closed: sent at once, not held `linger_ms` for appends that never come
                builder.close()
                acks.append(await producer.send_batch(builder, args.sink, partition=p))
            await asyncio.gather(*acks)
            await consumer.commit(fetched.next_offsets)
    finally:
        await consumer.stop()
        await producer.stop()


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
    import uvloop

    uvloop.run(echo(parser.parse_args()))


if __name__ == "__main__":
    main()
