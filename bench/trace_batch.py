"""CPU of the worker's tracing per micro-batch, without a broker.

One micro-batch of 175 ticks (the size a worker sees at 20,000 ticks/s), laid out as a
fetch gives it: the header scan of a batch without traced ticks, then a batch with
`--traced` traced ticks through `BatchTracing.find`, `signal_headers` and `end` into a
batching span processor, then the OTLP/protobuf encoding of the spans that made (what
the exporter thread does). CPU time of this process; the heap is frozen first, as
`tickserve serve` freezes it. Several rounds, each figure per micro-batch.
Run: python -m bench.trace_batch [--rounds 5 --batches 2000 --traced 1]
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable, Sequence

import numpy as np
from aiokafka import TopicPartition
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from stream.kafka.fetched import Fetched
from stream.kafka.recordbatch import batch_bounds, parse_batches
from stream.worker.tracing import BatchTracing
from tickserve.tracing import TRACEPARENT, Tracing

TICKS = 175
VALUE = b'{"symbol":"BTC/USDT","event_ns":1,"price":1.0,"quantity":2.0,"side":"buy"}'


class _Keep(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def _fetched(traced: int) -> Fetched:
    builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1 << 22)
    for i in range(TICKS):
        value = f"00-{i + 1:032x}-{i + 1:016x}-01".encode()
        headers = [(TRACEPARENT, value)] if i < traced else []
        builder.append(i, timestamp=1000, key=b"BTC/USDT", value=VALUE, headers=headers)
    buf = np.frombuffer(bytes(builder.build()), np.uint8)
    starts, ends, _ = batch_bounds(buf)
    offset, ks, kl, vs, vl, stamps, _, _ = parse_batches(buf, starts, ends, 0, False)
    partition = np.zeros(TICKS, np.int32)
    return Fetched("ticks", buf, partition, offset, ks, kl, vs, vl, stamps,
                   {TopicPartition("ticks", 0): TICKS})  # fmt: skip


def _cpu_us(fn: Callable[[], object], n: int) -> float:
    start = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - start) / n * 1e6


def main() -> None:
    """Print, per round: header scan, traced batch, encoding, all in us per micro-batch."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--traced", type=int, default=1, help="traced ticks per micro-batch")
    args = parser.parse_args()
    keep = _Keep()
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: "tickserve-worker"}))
    provider.add_span_processor(
        BatchSpanProcessor(keep, max_queue_size=1 << 20, max_export_batch_size=512)
    )
    tracing = BatchTracing(Tracing(provider.get_tracer("tickserve")), "ticks", "signals", "g")
    plain, traced = _fetched(0), _fetched(args.traced)
    rows = np.arange(TICKS, dtype=np.int64)

    def one_traced() -> None:
        batch = tracing.find(traced, time.time_ns())
        assert batch is not None
        now = time.time_ns()
        batch.signal_headers(rows, now)
        batch.end((now, now, now), now, TICKS)

    gc.collect()
    gc.freeze()
    print(f"{TICKS} ticks per micro-batch, {args.traced} traced; us of CPU per micro-batch")
    for k in range(args.rounds):
        scan = _cpu_us(lambda: tracing.find(plain, 0), args.batches)
        provider.force_flush()
        keep.spans.clear()
        spans_us = _cpu_us(one_traced, args.batches)
        provider.force_flush()
        made = list(keep.spans)
        start = time.process_time()
        for i in range(0, len(made), 512):
            encode_spans(made[i : i + 512]).SerializeToString()
        encode = (time.process_time() - start) / args.batches * 1e6
        print(f"round {k + 1}: header scan {scan:.1f}; traced batch {spans_us:.1f} "
              f"+ encoding {encode:.1f} ({len(made) / args.batches:.0f} spans)")  # fmt: skip
    provider.shutdown()


if __name__ == "__main__":
    main()
