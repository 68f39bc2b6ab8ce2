"""An independent floor: a do-nothing echo on confluent-kafka (librdkafka).

Consumes the ticks in a consumer group (`consume` up to --max-batch at a time) and
produces each tick's bytes, unchanged, to the output topic, waits for the delivery
reports (`flush`) and commits the next offsets: the job of the worker minus all of its
work, done by the C client most Kafka shops run. Same knobs as the worker's clients
(fetch wait, linger, acks=all, no idempotence, manual commits, earliest) and its
TICKSERVE_KAFKA_* security settings. librdkafka runs its own threads: their CPU is
this process's, as it should be.

Run: python -m bench.echo_confluent --bootstrap HOST:PORT --source T --sink T2 --group G
"""

from __future__ import annotations

import argparse
import signal
import time

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from bench.floor_args import floor_parser
from deploy.settings import load_settings
from stream.kafka.clients import MAX_PARTITION_FETCH_BYTES


def echo(args: argparse.Namespace) -> None:
    """Forward until SIGTERM."""
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    security = load_settings().kafka_security.librdkafka_config()
    common = {"bootstrap.servers": args.bootstrap, **security}
    consumer = Consumer(
        {
            **common,
            "group.id": args.group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": args.fetch_max_wait_ms,
            "max.partition.fetch.bytes": MAX_PARTITION_FETCH_BYTES,
        }
    )
    producer = Producer(
        {**common, "acks": "all", "linger.ms": args.linger_ms, "enable.idempotence": False}
    )
    assigned: list[TopicPartition] = []
    consumer.subscribe([args.source], on_assign=lambda c, parts: assigned.extend(parts))
    try:
        partitions = len(producer.list_topics(args.sink, timeout=30).topics[args.sink].partitions)
        deadline = time.monotonic() + 120
        while not assigned:  # librdkafka joins a group in the background (~23 s here)
            if time.monotonic() > deadline:
                raise SystemExit("no partitions assigned within 120 s")
            for m in consumer.consume(num_messages=args.max_batch, timeout=0.1):
                raise SystemExit(f"a record before the assignment: {m.topic()}")
        print("assigned", flush=True)
        while not stopping:
            msgs = consumer.consume(num_messages=args.max_batch, timeout=0.1)
            if not msgs:
                continue
            offsets: dict[int, int] = {}
            for m in msgs:
                if m.error() is not None:
                    raise KafkaException(m.error())
                partition = m.partition()
                producer.produce(args.sink, m.value(), m.key(), partition=partition % partitions)
                offsets[partition] = m.offset() + 1
            producer.flush()
            consumer.commit(
                offsets=[TopicPartition(args.source, p, o) for p, o in offsets.items()],
                asynchronous=True,
            )
    finally:
        producer.flush(10)
        consumer.close()


def main() -> None:
    """Entry point."""
    parser = floor_parser(__doc__)
    echo(parser.parse_args())


if __name__ == "__main__":
    main()
