"""An independent floor: a do-nothing echo on stock aiokafka, public API only.

Consumes the ticks with `getmany` in a consumer group and produces each tick's bytes,
unchanged, to the output topic with `send_batch` (one batch per partition per poll,
as aiokafka's docs show), waits for the acks and commits: the job of the worker minus
all of its work, done by a client tickserve did not write. Same knobs as the worker's
clients (`stream.kafka.clients`: fetch wait, linger, acks=all, manual commits) and its
TICKSERVE_KAFKA_* security settings.

Run: python -m bench.echo_aiokafka --bootstrap HOST:PORT --source T --sink T2 --group G
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.floor_args import floor_parser
from deploy.settings import load_settings
from stream.kafka.clients import make_consumer, make_producer, start_client, wait_assigned


async def _send(
    producer: AIOKafkaProducer, topic: str, partition: int, msgs: list[Any]
) -> list[Any]:
    """Queue `msgs` as batches of `producer.create_batch()`; the futures resolve on the acks."""
    futures = []
    batch = producer.create_batch()
    for m in msgs:
        if batch.append(key=m.key, value=m.value, timestamp=None) is None:
            batch.close()
            futures.append(await producer.send_batch(batch, topic, partition=partition))
            batch = producer.create_batch()
            batch.append(key=m.key, value=m.value, timestamp=None)
    batch.close()
    futures.append(await producer.send_batch(batch, topic, partition=partition))
    return futures


async def echo(args: argparse.Namespace) -> None:
    """Forward until SIGTERM."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    security = load_settings().kafka_security
    producer = make_producer(args.bootstrap, args.linger_ms, security)
    consumer: AIOKafkaConsumer = make_consumer(
        args.bootstrap, args.group, [args.source], args.fetch_max_wait_ms, args.max_batch,
        security=security,
    )  # fmt: skip
    await start_client(producer, args.bootstrap, security)
    await start_client(consumer, args.bootstrap, security)
    try:
        partitions = len(await producer.partitions_for(args.sink))
        await wait_assigned(consumer, 120)
        print("assigned", flush=True)
        while not stop.is_set():
            fetched = await consumer.getmany(timeout_ms=100)
            if not fetched:
                continue
            acks = []
            for tp, msgs in fetched.items():
                acks += await _send(producer, args.sink, tp.partition % partitions, msgs)
            await asyncio.gather(*acks)
            offsets = {tp: msgs[-1].offset + 1 for tp, msgs in fetched.items()}
            await consumer.commit(offsets)
    finally:
        await consumer.stop()
        await producer.stop()


def main() -> None:
    """Entry point."""
    parser = floor_parser(__doc__)
    import uvloop

    uvloop.run(echo(parser.parse_args()))


if __name__ == "__main__":
    main()
