"""The sink: reads an output topic from the start and records, per record, when it arrived.

Writes an .npz with trade ids, intended send times (`recv_ns` of the tick), arrival
times and, for tickserve signals, the stage timestamps of header `t`.

Run: python -m bench.sink --bootstrap HOST:PORT --topic T --expect N --out FILE.npz
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from stream.signal import STAGES


async def collect(args: argparse.Namespace) -> None:
    """Read until `expect` records arrived or nothing came for `idle_s` after the deadline."""
    consumer = AIOKafkaConsumer(bootstrap_servers=args.bootstrap, enable_auto_commit=False,
                                fetch_max_wait_ms=args.fetch_max_wait_ms,
                                max_partition_fetch_bytes=4 * 1024 * 1024)  # fmt: skip
    await consumer.start()
    ids: list[int] = []
    sent: list[int] = []
    arrived: list[int] = []
    stages: list[tuple[int, ...]] = []
    try:
        parts = [TopicPartition(args.topic, p) for p in range(args.partitions)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        print("ready", flush=True)
        last = time.monotonic()
        deadline = time.monotonic() + args.timeout
        while len(ids) < args.expect and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=100, max_records=10_000)
            now = time.time_ns()
            if not batches:
                if time.monotonic() - last > args.idle_s and ids:
                    break
                continue
            last = time.monotonic()
            for msgs in batches.values():
                for m in msgs:
                    doc = orjson.loads(m.value)
                    ids.append(int(doc["trade_id"]))
                    sent.append(doc["recv_ns"])
                    arrived.append(now)
                    if m.headers:
                        stages.append(STAGES.unpack(dict(m.headers)["t"]))
    finally:
        await consumer.stop()
    np.savez(
        args.out,
        trade_id=np.asarray(ids, np.int64),
        sent_ns=np.asarray(sent, np.int64),
        arrived_ns=np.asarray(arrived, np.int64),
        stages_ns=np.asarray(stages, np.int64).reshape(-1, STAGES.size // 8),
    )


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--idle-s", type=float, default=5)
    parser.add_argument("--fetch-max-wait-ms", type=int, default=20)
    import uvloop

    uvloop.run(collect(parser.parse_args()))


if __name__ == "__main__":
    main()
