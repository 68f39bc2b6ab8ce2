"""Record batches of signals built in bulk: aiokafka's bytes, encode_signals' values, the broker."""

from __future__ import annotations

import asyncio
import inspect
import re
from dataclasses import dataclass
from typing import Any, cast

import aiokafka
import numpy as np
import orjson
import pytest
from aiokafka.producer import message_accumulator
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

from deploy.settings import Settings
from stream.contracts.signal import STAGES, Signal, encode_signals
from stream.kafka.aiokafka_adapter import PrebuiltBatch, send_batches
from stream.kafka.clients import ensure_topics, make_producer, start_client
from stream.kafka.recordbatch import DEFAULT_MAX_BATCH_BYTES
from stream.kafka.signalbatch import encode_signal_batches, record_batch
from tests.helpers import read_topic, run

NOW_NS = 1_700_000_000_123_456_789
TIMING = STAGES.pack(NOW_NS, NOW_NS + 1, NOW_NS + 2, NOW_NS + 3, NOW_NS + 4)
HEADERS = [("t", TIMING)]
ODD = ['A"B', "back\\slash", "ünï/€", "\x00ctl\n\t", "emoji 🚀", "", "/"]


@dataclass
class Rows:
    """One micro-batch's signal inputs, as encode_signals and encode_signal_batches take them."""

    symbols: list[str]
    trade_ids: list[str]
    keys: list[bytes | None]
    event_ns: np.ndarray
    recv_ns: np.ndarray
    scores: np.ndarray
    partition: np.ndarray
    ready: np.ndarray | None = None  # None: where the score is not NaN

    @property
    def is_ready(self) -> np.ndarray:
        return ~np.isnan(self.scores) if self.ready is None else self.ready

    @property
    def offsets(self) -> np.ndarray:  # the ticks' offsets: any int64 will do
        return np.arange(len(self.scores), dtype=np.int64) * 977 + 2**40

    def values(self, emit_ns: int, model: str, version: str, threshold: float) -> list[bytes]:
        scores = [
            s if r else None for s, r in zip(self.scores.tolist(), self.is_ready, strict=True)
        ]
        return encode_signals(self.symbols, self.trade_ids, self.event_ns.tolist(),
                              self.recv_ns.tolist(), self.partition.tolist(),
                              self.offsets.tolist(), emit_ns, model, version, scores,
                              threshold)  # fmt: skip

    def batches(self, emit_ns: int, model: str, version: str, threshold: float,
                timestamp_ms: int, max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
                ) -> list[tuple[int, bytes, int]]:  # fmt: skip
        # symbols and trade ids as their escaped JSON content, keys raw, all in one buffer
        parts = ([orjson.dumps(s)[1:-1] for s in self.symbols],
                 [orjson.dumps(t)[1:-1] for t in self.trade_ids],
                 [k or b"" for k in self.keys])  # fmt: skip
        text = b"".join(b"".join(p) for p in parts)
        spans = []
        at = 0
        for p in parts:
            lens = np.array([len(b) for b in p], np.int64)
            spans.append((at + np.cumsum(lens) - lens, lens))
            at += int(lens.sum())
        key_len = np.where([k is None for k in self.keys], -1, spans[2][1])
        return encode_signal_batches(
            np.frombuffer(text, np.uint8), sym_start=spans[0][0], sym_len=spans[0][1],
            key_start=spans[2][0], key_len=key_len, tid_start=spans[1][0], tid_len=spans[1][1],
            event_ns=self.event_ns, recv_ns=self.recv_ns, tick_partition=self.partition,
            tick_offset=self.offsets, ready=self.is_ready, emit_ns=emit_ns, model=model,
            version=version, scores=self.scores, threshold=threshold, partition=self.partition,
            timestamp_ms=timestamp_ms, headers=HEADERS, max_batch_bytes=max_batch_bytes,
        )  # fmt: skip


def random_rows(n: int, seed: int, partitions: int = 4) -> Rows:
    rng = np.random.default_rng(seed)
    names = [f"SYN{i:03d}/USD" for i in range(50)] + ODD
    symbols = [names[i] for i in rng.integers(0, len(names), n)]
    trade_ids = [str(i) if i % 5 else ODD[i % len(ODD)] + str(i) for i in range(n)]
    keys: list[bytes | None] = [None if i % 11 == 3 else s.encode() for i, s in enumerate(symbols)]
    kind = rng.integers(0, 8, n)
    scores = rng.random(n)
    scores[kind == 0] = np.nan
    scores[kind == 1] = 0.5  # exactly at the threshold: UP
    scores[kind == 2] = np.nextafter(0.5, 0)  # just below: DOWN
    scores[kind == 3] = rng.normal(size=n)[kind == 3] * 1e300
    scores[kind == 4] = rng.normal(size=n)[kind == 4] * 1e-300
    scores[kind == 5] = rng.choice([0.0, -0.0, 1.0, 5e-324, 1e16, 1.2345678901234567e17], n)[
        kind == 5
    ]
    event_ns = NOW_NS + rng.integers(0, 10**12, n)
    event_ns[::97] = rng.choice([0, -1, -10, 9, 10, 2**63 - 1, -(2**63)], len(event_ns[::97]))
    ready = kind != 0
    scores[kind == 6] = rng.choice([np.nan, np.inf, -np.inf], n)[kind == 6]  # model errors
    return Rows(symbols, trade_ids, keys, event_ns, event_ns + rng.integers(0, 10**6, n), scores,
                rng.integers(0, partitions, n), ready)  # fmt: skip


def aiokafka_batches(rows: Rows, values: list[bytes], timestamp_ms: int,
                     max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
                     ) -> list[tuple[int, bytes, int]]:  # fmt: skip
    """The batches the worker builds today: producer.create_batch() and one append per record."""
    out: list[tuple[int, bytes, int]] = []
    for p in sorted(set(rows.partition.tolist())):
        builder = BatchBuilder(max_batch_bytes, 0)
        for i in np.flatnonzero(rows.partition == p).tolist():
            record = {"timestamp": timestamp_ms, "key": rows.keys[i], "value": values[i],
                      "headers": HEADERS}  # fmt: skip
            if builder.append(**record) is None:
                out.append((p, bytes(builder._build()), builder.record_count()))
                builder = BatchBuilder(max_batch_bytes, 0)
                assert builder.append(**record) is not None
        out.append((p, bytes(builder._build()), builder.record_count()))
    return out


def decode(batches: list[tuple[int, bytes, int]]) -> list[tuple[int, Any]]:
    """(partition, record) of every record, through aiokafka's reader (CRC checked)."""
    out: list[tuple[int, Any]] = []
    for p, data, count in batches:
        batch = DefaultRecordBatch(data)
        assert batch.validate_crc()
        records = list(batch)
        assert len(records) == count
        out.extend((p, r) for r in records)
    return out


def test_bytes_equal_aiokafka_batch_builder() -> None:
    rows = random_rows(500, seed=1)
    values = rows.values(NOW_NS, "model-x", "7", 0.5)
    ours = rows.batches(NOW_NS, "model-x", "7", 0.5, timestamp_ms=NOW_NS // 10**6)
    assert ours == aiokafka_batches(rows, values, NOW_NS // 10**6)
    assert len(ours) == 4


def test_bytes_equal_default_record_batch_builder() -> None:
    """The layer under BatchBuilder, configured as BatchBuilder configures it."""
    rows = random_rows(50, seed=2, partitions=1)
    values = rows.values(NOW_NS, "m", "1", 0.5)
    builder = DefaultRecordBatchBuilder(2, 0, is_transactional=0, producer_id=-1,
                                        producer_epoch=-1, base_sequence=0,
                                        batch_size=DEFAULT_MAX_BATCH_BYTES)  # fmt: skip
    for k, (key, value) in enumerate(zip(rows.keys, values, strict=True)):
        assert builder.append(k, 1234, key, value, HEADERS) is not None
    [(_, data, count)] = rows.batches(NOW_NS, "m", "1", 0.5, timestamp_ms=1234)
    assert data == bytes(builder.build())
    assert count == 50


@pytest.mark.parametrize("max_batch_bytes", [1, 300, 2000, 10_000])
def test_splits_where_batch_builder_splits(max_batch_bytes: int) -> None:
    rows = random_rows(400, seed=3)
    values = rows.values(NOW_NS, "m", "1", 0.5)
    ours = rows.batches(NOW_NS, "m", "1", 0.5, 99, max_batch_bytes)
    assert ours == aiokafka_batches(rows, values, 99, max_batch_bytes)
    assert all(len(data) < max_batch_bytes or count == 1 for _, data, count in ours)
    # every row once, each partition's rows in row order
    decoded = decode(ours)
    assert len(decoded) == 400 == sum(count for _, _, count in ours)
    for p in range(4):
        mine = [r.value for q, r in decoded if q == p]
        assert mine == [values[i] for i in np.flatnonzero(rows.partition == p)]


@pytest.mark.parametrize("seed", range(5))
def test_values_equal_encode_signals(seed: int) -> None:
    rows = random_rows(1000, seed=seed, partitions=3)
    model, version = ['tick"serve', "ü"][seed % 2], ["3", "v\\1"][seed % 2]
    threshold = [0.5, 0.0, 1e-300, -1.0, 0.7][seed]
    expected = rows.values(NOW_NS + seed, model, version, threshold)
    decoded = decode(rows.batches(NOW_NS + seed, model, version, threshold, 5))
    by_row = [r for p in range(3) for (q, r) in decoded if q == p]
    order = np.argsort(rows.partition, kind="stable")
    assert [r.value for r in by_row] == [expected[i] for i in order]
    assert [r.key for r in by_row] == [rows.keys[i] for i in order]
    assert all(r.headers == HEADERS and r.timestamp == 5 for r in by_row)
    signals = [Signal.decode(r.value) for r in by_row]
    assert {s.direction for s in signals} == {-1, 0, 1}
    assert not any(s.ready for s in signals if s.score is None and s.version == "")
    errors = [s for s in signals if s.error is not None]
    assert errors and all(
        (s.ready, s.score, s.direction, s.version, s.error)
        == (True, None, 0, version, "non_finite")
        for s in errors
    )
    assert [(s.partition, s.offset) for s in signals] == [
        (int(rows.partition[i]), int(rows.offsets[i])) for i in order
    ]


def test_nan_is_not_ready_and_threshold_is_up() -> None:
    rows = Rows(["A", "B", "C"], ["1", "2", "3"], [b"A", b"B", b"C"], np.arange(3),
                np.arange(3), np.array([np.nan, 0.5, 0.25]), np.zeros(3, np.int64))  # fmt: skip
    decoded = decode(rows.batches(9, "m", "4", 0.5, 1))
    signals = [Signal.decode(r.value) for _, r in decoded]
    assert [(s.score, s.version, s.direction, s.ready) for s in signals] == [
        (None, "", 0, False), (0.5, "4", 1, True), (0.25, "4", -1, True)
    ]  # fmt: skip


def test_empty_and_mismatched_inputs() -> None:
    empty = Rows([], [], [], np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0),
                 np.zeros(0, np.int64))  # fmt: skip
    assert empty.batches(1, "m", "1", 0.5, 1) == []
    one = np.zeros(1, np.int64)
    with pytest.raises(ValueError, match="one entry per row"):
        encode_signal_batches(
            np.zeros(4, np.uint8), sym_start=one, sym_len=one, key_start=one, key_len=one,
            tid_start=one, tid_len=one, event_ns=one, recv_ns=one, tick_partition=one,
            tick_offset=one, emit_ns=1, model="m",
            version="1", scores=np.zeros(2), threshold=0.5, partition=one, timestamp_ms=1,
        )  # fmt: skip
    with pytest.raises(ValueError, match="outside the text buffer"):
        encode_signal_batches(
            np.zeros(4, np.uint8), sym_start=one + 3, sym_len=one + 2, key_start=one,
            key_len=one, tid_start=one, tid_len=one, event_ns=one, recv_ns=one, tick_partition=one,
            tick_offset=one, emit_ns=1,
            model="m", version="1", scores=np.zeros(1), threshold=0.5, partition=one,
            timestamp_ms=1,
        )  # fmt: skip


def test_producer_state_patch_equals_builder() -> None:
    """What an idempotent producer's accumulator does to a batch before sending it."""
    rows = random_rows(20, seed=4, partitions=1)
    values = rows.values(NOW_NS, "m", "1", 0.5)
    builder = BatchBuilder(DEFAULT_MAX_BATCH_BYTES, 0)
    for key, value in zip(rows.keys, values, strict=True):
        builder.append(timestamp=77, key=key, value=value, headers=HEADERS)
    builder._set_producer_state(12345, 3, 1000)
    [(_, data, count)] = rows.batches(NOW_NS, "m", "1", 0.5, 77)
    prebuilt = PrebuiltBatch(data, count)
    prebuilt._set_producer_state(12345, 3, 1000)
    assert prebuilt._build() == bytes(builder._build())
    assert prebuilt.size() == builder.size() and prebuilt.record_count() == 20


def test_crc32c_kernels_equal_aiokafka() -> None:
    from aiokafka.record.util import calc_crc32c

    from stream.kafka import recordbatch as records

    data = np.random.default_rng(6).integers(0, 256, 5000).astype(np.uint8)
    kernels = [records._crc32c_tables] + [records._crc32c_sse42] * records.HARDWARE_CRC
    for start, end in [(0, 0), (0, 1), (3, 10), (5, 17), (1, 4096), (7, 5000)]:
        expected = calc_crc32c(data[start:end].tobytes())
        assert [crc(data, start, end) for crc in kernels] == [expected] * len(kernels)


# aiokafka internals PrebuiltBatch stands in for (see its docstring): review on upgrade
AIOKAFKA_SERIES = "0.14."


def test_pinned_aiokafka_builder_protocol() -> None:
    assert aiokafka.__version__.startswith(AIOKAFKA_SERIES), (
        f"aiokafka {aiokafka.__version__}: check PrebuiltBatch against its BatchBuilder use"
    )
    source = inspect.getsource(message_accumulator)
    used = set(re.findall(r"_builder\.(\w+)", source))
    # MessageAccumulator.add_batch hands the builder to MessageBatch as it is
    assert "MessageBatch(tp, builder," in source
    assert used - {"build", "set_producer_state", "size"} <= set(dir(PrebuiltBatch)), used
    # the three left out are BatchBuilder's own calls into DefaultRecordBatchBuilder
    assert used == {"append", "close", "closed", "record_count", "_set_producer_state",
                    "_build", "build", "set_producer_state", "size"}  # fmt: skip
    prebuilt: Any = PrebuiltBatch(b"x" * 70, 2)
    assert prebuilt.append(timestamp=1, key=b"k", value=b"v", headers=[]) is None
    prebuilt.close()
    assert prebuilt.closed() and prebuilt.size() == 70 and prebuilt.record_count() == 2


def test_round_trip_through_broker(topics: Settings) -> None:
    rows = random_rows(3000, seed=5)
    rows.symbols[0] = rows.trade_ids[0] = 'quo"te \\ ü'
    values = rows.values(NOW_NS, "m", "9", 0.5)
    timestamp_ms = NOW_NS // 10**6
    # small batches: several per partition, in flight one after another
    batches = rows.batches(NOW_NS, "m", "9", 0.5, timestamp_ms, max_batch_bytes=64 * 1024)
    assert len(batches) > 4
    topic = topics.signals_topic

    async def produce() -> list[Any]:
        await ensure_topics(topics.bootstrap, [topic], 4)
        producer = make_producer(topics.bootstrap)
        await start_client(producer, topics.bootstrap)
        try:
            acks = await send_batches(producer, topic, batches)
            return list(await asyncio.wait_for(asyncio.gather(*acks), 30))
        finally:
            await producer.stop()

    metadata = cast(list[Any], run(produce()))
    assert [(m.topic, m.partition) for m in metadata] == [(topic, p) for p, _, _ in batches]
    records = cast(list[Any], run(read_topic(topics.bootstrap, topic, 4, len(values))))
    assert len(records) == len(values)
    for p in range(4):
        got = sorted((r for r in records if r.partition == p), key=lambda r: r.offset)
        rows_p = np.flatnonzero(rows.partition == p).tolist()
        assert [r.value for r in got] == [values[i] for i in rows_p]
        assert [r.key for r in got] == [rows.keys[i] for i in rows_p]
        assert [r.offset for r in got] == list(range(len(rows_p)))
        assert all(r.timestamp == timestamp_ms for r in got)
        assert all(list(r.headers) == [("t", TIMING)] for r in got)
    assert len({Signal.decode(r.value).trade_id for r in records}) == len(values)


def test_stamp_last_writes_the_encoded_time_into_every_record() -> None:
    """The stage header's last field is stamped after the build, and the CRCs still hold."""
    rows = random_rows(600, seed=5)
    placeholder = [("t", STAGES.pack(NOW_NS, NOW_NS + 1, NOW_NS + 2, NOW_NS + 3, 0))]
    stamped = NOW_NS + 987_654_321
    text = b"".join(orjson.dumps(s)[1:-1] for s in rows.symbols)
    lens = np.array([len(orjson.dumps(s)) - 2 for s in rows.symbols], np.int64)
    starts = np.cumsum(lens) - lens
    batches = encode_signal_batches(
        np.frombuffer(text, np.uint8), sym_start=starts, sym_len=lens, key_start=starts,
        key_len=lens, tid_start=starts, tid_len=lens, event_ns=rows.event_ns,
        recv_ns=rows.recv_ns, tick_partition=rows.partition, tick_offset=rows.offsets,
        emit_ns=1, model="m", version="1", scores=rows.scores,
        threshold=0.5, partition=rows.partition, timestamp_ms=5, headers=placeholder,
        max_batch_bytes=16 * 1024, stamp_last=lambda: stamped,
    )  # fmt: skip
    records = decode(batches)  # CRC validated
    assert len(records) == 600 and len(batches) > 4
    for _, record in records:
        [(name, value)] = record.headers
        assert name == "t"
        assert STAGES.unpack(value) == (NOW_NS, NOW_NS + 1, NOW_NS + 2, NOW_NS + 3, stamped)
    with pytest.raises(ValueError, match="last header"):
        encode_signal_batches(
            np.frombuffer(text, np.uint8), sym_start=starts, sym_len=lens, key_start=starts,
            key_len=lens, tid_start=starts, tid_len=lens, event_ns=rows.event_ns,
            recv_ns=rows.recv_ns, tick_partition=rows.partition, tick_offset=rows.offsets,
        emit_ns=1, model="m", version="1", scores=rows.scores,
            threshold=0.5, partition=rows.partition, timestamp_ms=5, stamp_last=lambda: 1,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("key", "value", "headers"),
    [
        (b"k", b"v" * 300, [("reason", b"late"), ("empty", None)]),
        (None, b"", []),
        (b"x" * 200, None, [("source", b"ticks:0:17")]),
    ],
)
def test_a_record_batch_of_one_reads_back_with_aiokafka(
    key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes | None]]
) -> None:
    batch = DefaultRecordBatch(bytearray(record_batch(key, value, headers, 1_700_000_000_123)))
    assert batch.validate_crc()
    [record] = list(batch)
    assert (record.key, record.value, record.headers) == (key, value, headers)
    assert (record.offset, record.timestamp) == (0, 1_700_000_000_123)
