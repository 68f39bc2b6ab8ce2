"""The broker floor: consume ticks and produce the same bytes, nothing else.

Same consumer and producer settings as the worker, and the same produce path (one
record batch per partition, commit after the acks), so the difference between
this and `tickserve serve` is tickserve's own work.

Run: python -m bench.echo --bootstrap HOST:PORT --source T --sink T2 --group G
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time

from stream.kafka import make_consumer, make_producer, start_client


async def echo(args: argparse.Namespace) -> None:
    """Forward until SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    consumer = make_consumer(args.bootstrap, args.group, [args.source], args.fetch_max_wait_ms,
                             args.max_batch)  # fmt: skip
    producer = make_producer(args.bootstrap, args.linger_ms)
    await start_client(producer, args.bootstrap)
    await start_client(consumer, args.bootstrap)
    partitions = len(await producer.partitions_for(args.sink))
    while not consumer.assignment():
        await asyncio.sleep(0.05)
    print("assigned", flush=True)
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100, max_records=args.max_batch)
            if not batches:
                continue
            acks = []
            now_ms = time.time_ns() // 1_000_000
            for tp, msgs in batches.items():
                p = tp.partition % partitions
                builder = producer.create_batch()
                for m in msgs:
                    if builder.append(timestamp=now_ms, key=m.key, value=m.value) is None:
                        acks.append(await producer.send_batch(builder, args.sink, partition=p))
                        builder = producer.create_batch()
                        builder.append(timestamp=now_ms, key=m.key, value=m.value)
                acks.append(await producer.send_batch(builder, args.sink, partition=p))
            await asyncio.gather(*acks)
            await consumer.commit({tp: msgs[-1].offset + 1 for tp, msgs in batches.items()})
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
