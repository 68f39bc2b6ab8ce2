"""The sink: reads an output topic from the start and records, per record, when it arrived.

Writes an .npz with trade ids, intended send times (`recv_ns` of the tick), arrival
times and, for tickserve signals, the stage timestamps of header `t`.

It reads the way the worker does (`stream.kafka.wire.WireFetcher`: record batches as columns)
and picks its three fields out with one Numba pass: a ConsumerRecord and a JSON parse
per record cost ~10 us, a fifth of a core at 20,000 records/s, which this 2-core
machine's broker and worker then lacked (the harness must not load the system under
test more than it has to).

Run: python -m bench.sink --bootstrap HOST:PORT --topic T --expect N --out FILE.npz
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition
from numba import njit

from deploy.settings import load_settings
from stream.contracts.signal import STAGES
from stream.kafka import wire
from stream.kafka.recordbatch import read_varint
from stream.kafka.wire import WireFetcher

TRADE_ID = np.frombuffer(b'"trade_id":', np.uint8)
RECV_NS = np.frombuffer(b'"recv_ns":', np.uint8)
STAGE_BYTES = STAGES.size


@njit(cache=True)
def _int_after(buf: np.ndarray, start: int, end: int, key: np.ndarray) -> int:
    """The integer after `key` in buf[start:end] (quoted or not); -1 if absent."""
    n = key.shape[0]
    for pos in range(start, end - n):
        match = True
        for k in range(n):
            if buf[pos + k] != key[k]:
                match = False
                break
        if match:
            pos += n
            if buf[pos] == 34:  # '"'
                pos += 1
            value = 0
            while pos < end and 48 <= buf[pos] <= 57:
                value = value * 10 + (buf[pos] - 48)
                pos += 1
            return value
    return -1


@njit(cache=True)
def fields(buf, value_start, value_len, trade_id, recv_ns, stages, has_stages):  # type: ignore[no-untyped-def]
    """Per record: trade id and recv_ns from the JSON value, header `t` if present.

    A v2 record's headers follow its value: a count, then per header a key length,
    the key, a value length and the value (zigzag varints).
    """
    for i in range(value_start.shape[0]):
        start, end = value_start[i], value_start[i] + value_len[i]
        trade_id[i] = _int_after(buf, start, end, TRADE_ID)
        recv_ns[i] = _int_after(buf, start, end, RECV_NS)
        count, pos = read_varint(buf, end)
        has_stages[i] = False
        for _ in range(count):
            key_len, pos = read_varint(buf, pos)
            key_at = pos
            pos += key_len
            val_len, pos = read_varint(buf, pos)
            if key_len == 1 and buf[key_at] == 116 and val_len == stages.shape[1]:  # "t"
                stages[i, :] = buf[pos : pos + val_len]
                has_stages[i] = True
            pos += val_len


async def collect(args: argparse.Namespace) -> None:
    """Read until `expect` records arrived or nothing came for `idle_s` after the deadline."""
    wire.warm_up()
    security = load_settings().kafka_security  # TICKSERVE_KAFKA_*, as the worker reads them
    consumer = AIOKafkaConsumer(bootstrap_servers=args.bootstrap, enable_auto_commit=False,
                                fetch_max_wait_ms=args.fetch_max_wait_ms,
                                max_partition_fetch_bytes=4 * 1024 * 1024,
                                **security.aiokafka_kwargs())  # fmt: skip
    await consumer.start()
    ids: list[np.ndarray] = []
    sent: list[np.ndarray] = []
    arrived: list[np.ndarray] = []
    stages: list[np.ndarray] = []
    received = 0
    fetcher = None
    try:
        parts = [TopicPartition(args.topic, p) for p in range(args.partitions)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        fetcher = WireFetcher(
            consumer,
            args.topic,
            args.fetch_max_wait_ms,
            security=security,
            bootstrap=args.bootstrap,
        )
        print("ready", flush=True)
        last = time.monotonic()
        deadline = time.monotonic() + args.timeout
        while received < args.expect and time.monotonic() < deadline:
            fetched = await fetcher.poll(100)
            now = time.time_ns()
            n = len(fetched)
            if not n:
                if time.monotonic() - last > args.idle_s and received:
                    break
                continue
            last = time.monotonic()
            tid, recv = np.empty(n, np.int64), np.empty(n, np.int64)
            raw, has = np.empty((n, STAGE_BYTES), np.uint8), np.empty(n, np.bool_)
            fields(fetched.buf, fetched.value_start, fetched.value_len, tid, recv, raw, has)
            ids.append(tid)
            sent.append(recv)
            arrived.append(np.full(n, now, np.int64))
            stages.append(raw[has].view("<i8"))
            received += n
    finally:
        if fetcher is not None:
            await fetcher.close()
        await consumer.stop()

    def joined(chunks: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(chunks) if chunks else np.empty(0, np.int64)

    np.savez(
        args.out,
        trade_id=joined(ids),
        sent_ns=joined(sent),
        arrived_ns=joined(arrived),
        stages_ns=(np.concatenate(stages) if stages else np.empty((0, STAGE_BYTES // 8), np.int64)),
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
