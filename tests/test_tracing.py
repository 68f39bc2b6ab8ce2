"""Traces tick -> signal: header scan, signal headers, then the real stack into an OTLP receiver."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka import TopicPartition
from aiokafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from oteltap import OtelTapHttpProtobufReceiver, OtelTapHttpProtobufReceiverSettings

from deploy.settings import Settings
from deploy.stack import free_port
from features.engine import FeatureEngine
from features.spec import FeatureSpec
from inference.batcher import BatcherConfig, MicroBatcher
from inference.testing import loaded, make_onnx_classifier
from stream.contracts.signal import Signal
from stream.contracts.tick import Tick
from stream.ingest.archive import ArchiverConfig, ClickHouseArchive, run_archiver
from stream.ingest.feed import Pacing, SyntheticMarket, publish
from stream.kafka import wire_io
from stream.kafka.base import DataPlane, DataPlaneConfig
from stream.kafka.clients import ensure_topics
from stream.kafka.fetched import Fetched
from stream.kafka.recordbatch import batch_bounds, find_header, parse_batches
from stream.kafka.signalbatch import encode_signal_batches
from stream.kafka.testing import FakeSink, FakeSource
from stream.worker import StreamWorker, WorkerConfig
from tests.helpers import LoopThread, read_topic, run, tickserve
from tickserve.tracing import TRACEPARENT, Tracing, extract_context, span_context, tracing_provider

TP = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
KEY = np.frombuffer(TRACEPARENT.encode(), np.uint8)


def _batch(records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]) -> bytes:
    builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1 << 20)
    for i, (key, value, headers) in enumerate(records):
        builder.append(i, timestamp=1000, key=key, value=value, headers=headers)
    return bytes(builder.build())


def test_find_header_finds_exactly_the_records_that_carry_it() -> None:
    records = [
        (b"k", b"v0", []),
        (None, None, [(TRACEPARENT, TP)]),  # null value: headers follow the -1 length
        (b"k", b"v2", [("t", b"12345678"), (TRACEPARENT, TP + b"x")]),
        (b"k", b"", [("traceparenT", TP)]),  # another key
        (b"k", b"v4" * 200, []),
        (b"k", b"v5", [(TRACEPARENT, b"")]),
    ]
    raw = _batch(records) + _batch(records)
    buf = np.frombuffer(raw, np.uint8)
    starts, ends, status = batch_bounds(buf)
    assert status == 0
    _, _, _, vs, vl, _, _, _ = parse_batches(buf, starts, ends, 0, False)
    rows, at, size = find_header(buf, vs, vl, KEY)
    assert rows.tolist() == [1, 2, 5, 7, 8, 11]
    values = [buf[a : a + n].tobytes() for a, n in zip(at, size, strict=True)]
    assert values == [TP, TP + b"x", b""] * 2


def test_find_header_reads_nothing_outside_the_buffer() -> None:
    # spans of the aiokafka fallback index a buffer of keys and values only
    buf = np.frombuffer(b"\x02\x16traceparent\x7f" + b"abc", np.uint8)
    rows, _, _ = find_header(buf, np.array([0, 14, 17]), np.array([0, 3, 0]), KEY)
    assert rows.tolist() == []


def test_signals_of_traced_rows_carry_their_headers_and_the_rest_are_unchanged() -> None:
    n = 7
    symbols = [f"S{i % 3}" for i in range(n)]
    text = "".join(symbols).encode() + b"".join(f"t{i}".encode() for i in range(n))
    sym_start = np.arange(n) * 2
    tid_start = 2 * n + np.arange(n) * 2
    common: dict[str, Any] = dict(
        sym_start=sym_start, sym_len=np.full(n, 2), key_start=sym_start, key_len=np.full(n, 2),
        tid_start=tid_start, tid_len=np.full(n, 2), event_ns=np.arange(n) + 10,
        recv_ns=np.arange(n) + 20, tick_partition=np.arange(n) % 2, tick_offset=np.arange(n),
        emit_ns=30, model="m", version="1",
        scores=np.linspace(0, 1, n), threshold=0.5, partition=np.arange(n) % 2,
        timestamp_ms=5, headers=[("t", b"\0" * 8)], stamp_last=lambda: 99,
    )  # fmt: skip
    plain = encode_signal_batches(np.frombuffer(text, np.uint8), **common)
    traced = encode_signal_batches(
        np.frombuffer(text, np.uint8), row_headers={1: [(TRACEPARENT, TP)], 4: []}, **common
    )

    def read(batches: list[tuple[int, bytes, int]]) -> list[tuple[int, bytes, list[Any]]]:
        out = []
        for p, data, _ in batches:
            out += [(p, r.value, list(r.headers)) for r in DefaultRecordBatch(data)]
        return out

    got, want = read(traced), read(plain)
    assert [v for _, v, _ in got] == [v for _, v, _ in want]
    stamp = (99).to_bytes(8, "little")
    for _, value, headers in got:
        trade = Signal.decode(value).trade_id
        assert headers[-1] == ("t", stamp)  # the stage header stays last, stamped
        assert headers[:-1] == ([(TRACEPARENT, TP)] if trade == "t1" else [])


def _worker_spans(traced: dict[int, bytes]) -> tuple[list[Any], list[tuple[int, list[Any]]]]:
    """One micro-batch of 30 ticks (those in `traced` with that traceparent) through a worker
    with tracing on and fakes of the data plane: (finished spans, signals' headers by tick)."""
    spec = FeatureSpec(bar_ns=100_000)
    model = loaded(make_onnx_classifier(spec.n_features, "logistic", seed=1), spec.n_features)
    source, sink = FakeSource(), FakeSink()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    worker = StreamWorker(
        WorkerConfig(DataPlaneConfig("nowhere:1", "ticks", "g"), "signals", "dlq", 0.0),
        FeatureEngine(spec),
        MicroBatcher(model, spec.n_features, BatcherConfig(max_batch=100)),
        lambda _: DataPlane(source, sink),
        tracing=Tracing(provider.get_tracer("test")),
    )
    start = time.time_ns() - 10**9
    ticks = [
        (
            b"A",
            Tick("A", start + i * 100_000, 1.0, 1.0, "buy", f"{i}", start).encode(),
            [(TRACEPARENT, traced[i])] if i in traced else [],
        )
        for i in range(30)
    ]
    buf = np.frombuffer(_batch(ticks), np.uint8)
    offset, ks, kl, vs, vl, stamps, _, _ = parse_batches(buf, *batch_bounds(buf)[:2], 0, False)
    source.push(
        Fetched("ticks", buf, np.zeros(30, np.int32), offset, ks, kl, vs, vl, stamps,
                {TopicPartition("ticks", 0): 30})
    )  # fmt: skip

    async def main() -> None:
        stop = asyncio.Event()
        run = asyncio.create_task(worker.run(stop))
        deadline = time.monotonic() + 20
        while not source.commits and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        stop.set()
        await run

    asyncio.run(main())
    signals = []
    for _, _, data, _ in sink.batches:
        for r in DefaultRecordBatch(data):
            signals.append((int(Signal.decode(r.value).trade_id), list(r.headers)))
    assert len(signals) == 30
    return list(exporter.get_finished_spans()), signals


def test_a_traced_tick_gets_batch_spans_and_its_signal_continues_its_trace() -> None:
    spans, signals = _worker_spans({7: TP})
    tick = span_context(extract_context([(TRACEPARENT, TP)]))  # type: ignore[arg-type]
    by_name = {s.name: s for s in spans}
    assert sorted(by_name) == sorted(
        ["process ticks", "decode", "features", "score", "send signals"]
    )
    process = by_name["process ticks"]
    assert process.kind == SpanKind.CONSUMER
    # the batch's only traced tick: the batch goes on in its trace, and is linked to it
    assert process.parent.span_id == tick.span_id and process.context.trace_id == tick.trace_id
    assert [link.context.span_id for link in process.links] == [tick.span_id]
    assert process.attributes["messaging.batch.message_count"] == 30
    for name in ("decode", "features", "score", "send signals"):
        assert by_name[name].parent.span_id == process.context.span_id
    send = by_name["send signals"]
    assert send.attributes["messaging.batch.message_count"] == 30
    assert by_name["decode"].end_time <= by_name["score"].start_time <= send.start_time
    for trade, headers in signals:
        extra = [(TRACEPARENT, f"00-{tick.trace_id:032x}-{send.context.span_id:016x}-01".encode())]
        assert headers[:-1] == (extra if trade == 7 else [])
        assert headers[-1][0] == "t"


def test_several_traced_ticks_in_a_batch_each_get_a_create_span_in_their_own_trace() -> None:
    other = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    spans, signals = _worker_spans({7: TP, 12: other})
    ticks = {
        trade: span_context(extract_context([(TRACEPARENT, value)]))  # type: ignore[arg-type]
        for trade, value in ((7, TP), (12, other))
    }
    names = sorted(s.name for s in spans)
    assert names == sorted(["process ticks", "decode", "features", "score", "send signals"]
                           + ["create signals"] * 2)  # fmt: skip
    [process] = [s for s in spans if s.name == "process ticks"]
    assert process.parent is None  # a trace of its own, linked to both ticks
    assert {link.context.span_id for link in process.links} == {t.span_id for t in ticks.values()}
    creates = {s.parent.span_id: s for s in spans if s.name == "create signals"}
    [send] = [s for s in spans if s.name == "send signals"]
    assert {link.context.span_id for link in send.links} == {
        c.context.span_id for c in creates.values()
    }
    for trade, headers in signals:
        if trade not in ticks:
            assert [k for k, _ in headers] == ["t"]
            continue
        tick = ticks[trade]
        create = creates[tick.span_id]
        assert create.context.trace_id == tick.trace_id
        assert [link.context.span_id for link in create.links] == [process.context.span_id]
        value = f"00-{tick.trace_id:032x}-{create.context.span_id:016x}-01".encode()
        assert headers[:-1] == [(TRACEPARENT, value)]


def test_a_micro_batch_without_traced_ticks_makes_no_span() -> None:
    spans, signals = _worker_spans({})
    assert spans == []
    assert all([k for k, _ in headers] == ["t"] for _, headers in signals)


def _span_ids(span: SpanProto) -> tuple[bytes, bytes]:
    return bytes(span.trace_id), bytes(span.span_id)


def _attr(span: SpanProto, key: str) -> Any:
    for kv in span.attributes:
        if kv.key == key:
            value = kv.value
            return getattr(value, value.WhichOneof("value"))
    return None


def _header_ids(headers: Any) -> tuple[bytes, bytes]:
    """(trace id, span id) a record's traceparent names."""
    context = extract_context(headers)
    assert context is not None, f"no traceparent in {headers}"
    sc = span_context(context)
    return sc.trace_id.to_bytes(16, "big"), sc.span_id.to_bytes(8, "big")


class Receiver:
    """oteltap on its own event loop thread, keeping every span it receives."""

    def __init__(self) -> None:
        self.port = free_port()
        self.spans: list[SpanProto] = []
        self.loop = LoopThread()
        self.tap = OtelTapHttpProtobufReceiver(OtelTapHttpProtobufReceiverSettings(self.port))
        self.loop.submit(self._start()).result(30)  # type: ignore[attr-defined]

    async def _start(self) -> None:
        await self.tap.start()
        ready = asyncio.Event()

        async def keep() -> None:
            stream = self.tap.stream_traces()
            ready.set()
            async for span in stream:
                self.spans.append(span)

        self.keeper = asyncio.create_task(keep())
        await asyncio.sleep(0)
        await ready.wait()

    def close(self) -> None:
        self.loop.submit(self.tap.stop()).result(30)  # type: ignore[attr-defined]
        self.loop.close()


@pytest.mark.services
def test_one_trace_from_feed_through_worker_to_signal_and_archive(
    topics: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = topics
    receiver = Receiver()
    # the exporter reads the standard variable itself
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{receiver.port}")
    providers = {name: tracing_provider(name) for name in ("feed", "worker", "archive")}
    # every tick traced, no cap (TraceBudget): the test follows each one
    tracing = {name: Tracing(p.get_tracer("test"), 1.0, 0.0) for name, p in providers.items()}
    bootstrap, ticks_topic, signals_topic = (
        settings.bootstrap, settings.ticks_topic, settings.signals_topic
    )  # fmt: skip
    run(ensure_topics(bootstrap, [ticks_topic, signals_topic, settings.dlq_topic], 2))

    spec = settings.feature_spec
    model = loaded(make_onnx_classifier(spec.n_features, "logistic", seed=1), spec.n_features)
    plane = DataPlaneConfig(bootstrap, ticks_topic, settings.group_id)
    worker = StreamWorker(
        WorkerConfig(plane, signals_topic, settings.dlq_topic),
        FeatureEngine(spec),
        MicroBatcher(model, spec.n_features, BatcherConfig(max_batch=100)),
        wire_io.open_dataplane,
        tracing=tracing["worker"],
    )
    loop = LoopThread()
    stop: asyncio.Event = loop.submit(_event()).result(5)  # type: ignore[attr-defined]
    done = loop.submit(worker.run(stop))
    count = 12
    try:
        deadline = time.monotonic() + 60
        while not worker.assigned.is_set():
            assert time.monotonic() < deadline, "worker never got its partitions"
            time.sleep(0.05)
        ticks = list(SyntheticMarket(symbols=3, seed=4).ticks(count))
        assert run(publish(ticks, bootstrap, ticks_topic, tracing=tracing["feed"])) == count
        signals = run(read_topic(bootstrap, signals_topic, 2, count, 60))
        archive = ClickHouseArchive.open(settings.clickhouse)
        config = ArchiverConfig(
            bootstrap, ticks_topic, settings.archive_group_id, signals_topic=signals_topic
        )
        run(run_archiver(archive, config, asyncio.Event(), 2.0, tracing=tracing["archive"]))
    finally:
        loop.loop.call_soon_threadsafe(stop.set)
        done.result(30)  # type: ignore[attr-defined]
        loop.close()
    tick_records = run(read_topic(bootstrap, ticks_topic, 2, count, 30))
    for provider in providers.values():
        provider.shutdown()  # exports what is queued
    try:
        deadline = time.monotonic() + 30
        while len(receiver.spans) < 4 * count and time.monotonic() < deadline:
            time.sleep(0.1)
        spans = list(receiver.spans)
    finally:
        receiver.close()

    by_id = {_span_ids(s): s for s in spans}
    assert len(signals) == count and len(tick_records) == count  # type: ignore[arg-type]
    tick_ids = {}
    for r in tick_records:  # type: ignore[attr-defined]
        trade = r.value.split(b'"trade_id":"')[1].split(b'"')[0].decode()
        tick_ids[trade] = _header_ids(r.headers)
    assert len(tick_ids) == count

    for record in signals:  # type: ignore[attr-defined]
        trade = Signal.decode(record.value).trade_id
        trace_id, feed_span_id = tick_ids[trade]
        # the tick's traceparent names the feed's send span
        feed = by_id[(trace_id, feed_span_id)]
        assert feed.name == f"send {ticks_topic}"
        assert feed.kind == SpanProto.SPAN_KIND_PRODUCER
        assert _attr(feed, "messaging.destination.name") == ticks_topic
        # the signal's traceparent continues the tick's trace (`stream.worker.tracing`)
        signal_trace, signal_parent = _header_ids(record.headers)
        assert signal_trace == trace_id
        named = by_id[(trace_id, signal_parent)]
        if named.name == f"create {signals_topic}":
            # a micro-batch of several traced ticks: a create span under the feed's, linked
            # to the batch's process span, which starts a trace of its own
            assert bytes(named.parent_span_id) == feed_span_id
            [batch_link] = named.links
            process = by_id[(bytes(batch_link.trace_id), bytes(batch_link.span_id))]
            assert not process.parent_span_id
        else:
            # the batch's only traced tick: its process span is a child of the feed's, and the
            # signal names the batch's send span
            assert named.name == f"send {signals_topic}"
            process = by_id[(trace_id, bytes(named.parent_span_id))]
            assert bytes(process.parent_span_id) == feed_span_id
        assert process.name == f"process {ticks_topic}"
        assert process.kind == SpanProto.SPAN_KIND_CONSUMER
        # ... and links back to the tick either way
        assert (trace_id, feed_span_id) in {
            (bytes(link.trace_id), bytes(link.span_id)) for link in process.links
        }
        assert _attr(process, "messaging.operation.type") == "process"
        assert _attr(process, "messaging.batch.message_count") >= 1
        children = {s.name: s for s in spans if bytes(s.parent_span_id) == bytes(process.span_id)}
        assert set(children) == {"decode", "features", "score", f"send {signals_topic}"}
        assert all(bytes(c.trace_id) == bytes(process.trace_id) for c in children.values())
        assert children["decode"].start_time_unix_nano == process.start_time_unix_nano
        assert children["decode"].end_time_unix_nano <= children["score"].start_time_unix_nano
        # the archiver continues both: the tick under the feed's span, the signal under its own
        parents = (feed_span_id, signal_parent)
        archived = {
            s.name
            for s in spans
            if bytes(s.trace_id) == trace_id
            and bytes(s.parent_span_id) in parents
            and _attr(s, "messaging.consumer.group.name") == settings.archive_group_id
        }
        assert archived == {f"process {ticks_topic}", f"process {signals_topic}"}


@pytest.mark.services
def test_the_feed_traces_at_most_its_cap_a_second(topics: Settings) -> None:
    # every tick a candidate (rate 1.0), 100 ticks/s for 2 s, at most 5 traced a second:
    # a burst of 5, then 5 more a second; without the cap all 200 would be
    bootstrap, topic = topics.bootstrap, topics.ticks_topic
    run(ensure_topics(bootstrap, [topic], 1))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    ticks = list(SyntheticMarket(symbols=3, seed=4).ticks(200))
    started = time.monotonic()
    sent = run(
        publish(ticks, bootstrap, topic, Pacing(rate=100.0),
                tracing=Tracing(provider.get_tracer("test"), 1.0, 5.0))
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert sent == 200
    records = run(read_topic(bootstrap, topic, 1, 200, 30))
    traced = [r for r in records if extract_context(r.headers) is not None]
    assert len(traced) == len(exporter.get_finished_spans())
    assert 5 + 5 * (elapsed - 1.0) <= len(traced) <= 5 + 5 * elapsed + 1, (len(traced), elapsed)


async def _event() -> asyncio.Event:
    return asyncio.Event()


@pytest.mark.services
def test_tickserve_feed_traces_only_when_an_otlp_endpoint_is_set(
    topics: Settings, tmp_path: Path
) -> None:
    topic = topics.ticks_topic
    env = {
        "TICKSERVE_BROKER_PORT": str(topics.broker_port),
        "TICKSERVE_TICKS_TOPIC": topic,
        "TICKSERVE_TRACE_SAMPLE_RATE": "1",
        "TICKSERVE_TRACE_MAX_PER_SECOND": "0",  # all 4 ticks traced
    }
    done = tickserve("feed", "--count", "3", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    receiver = Receiver()
    try:
        endpoint = f"http://127.0.0.1:{receiver.port}"
        done = tickserve(
            "feed",
            "--count",
            "4",
            env={**env, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint},
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 20  # the process flushed its spans as it exited
        while len(receiver.spans) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        spans = list(receiver.spans)
    finally:
        receiver.close()
    assert [s.name for s in spans] == [f"send {topic}"] * 4
    records = run(read_topic(topics.bootstrap, topic, topics.partitions, 7, 30))
    traced = [_header_ids(r.headers) for r in records if r.headers]  # type: ignore[attr-defined]
    assert len(records) == 7 and len(traced) == 4  # type: ignore[arg-type]
    assert set(traced) == {_span_ids(s) for s in spans}
