"""Microbenchmarks (pytest-benchmark; `make bench`), each beside its natural alternative.

Groups: tick decode (json vs orjson vs tickserve's batch and columnar decode), signal
encode, signals -> Kafka record batches (encode_signals + BatchBuilder appends vs
encode_signal_batches) and their CRC-32C, feature update (tickserve batch 1 and 1000
vs talipp tick by tick), the logistic model per batch size (ONNX Runtime vs
inference.linear), the micro-batcher over a bare `session.run`, online-store write per batch (Feast
DataFrame path vs tickserve's), a Fetch response parsed (aiokafka's struct decode and
records vs stream.kafka.wire's one pass).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pytest

from features.engine import FeatureEngine
from features.spec import NS_PER_SECOND, FeatureSpec
from stream.contracts.signal import encode_signals
from stream.contracts.tick import decode_batch
from stream.contracts.tickcodec import decode_columns, pack, warm_up

N = 1000
NOW = 1_700_000_000_000_000_000
RNG = np.random.default_rng(7)
TICKS = [
    {"symbol": f"SYN{i % 100:03d}/USD", "event_ns": NOW + i * 50_000,
     "price": float(100 + RNG.normal()), "quantity": 1.5, "side": "buy", "trade_id": str(i),
     "recv_ns": NOW + i}
    for i in range(N)
]  # fmt: skip
RAW = [orjson.dumps(t) for t in TICKS]


@pytest.mark.benchmark(group="decode 1000 ticks")
def test_decode_stdlib_json(benchmark: pytest.FixtureRequest) -> None:
    benchmark(lambda: [json.loads(r) for r in RAW])


@pytest.mark.benchmark(group="decode 1000 ticks")
def test_decode_orjson(benchmark: pytest.FixtureRequest) -> None:
    benchmark(lambda: [orjson.loads(r) for r in RAW])


@pytest.mark.benchmark(group="decode 1000 ticks")
def test_decode_tickserve_validated(benchmark: pytest.FixtureRequest) -> None:
    cols, rejected = benchmark(lambda: decode_batch(RAW, NOW * 2, 0))
    assert len(cols) == N and not rejected


@pytest.mark.benchmark(group="decode 1000 ticks")
def test_decode_tickserve_columnar(benchmark: pytest.FixtureRequest) -> None:
    """Laying out the values (`pack`) included, as decode_batch takes the same list."""
    warm_up()
    spans, rejected = benchmark(lambda: decode_columns(*pack(RAW), NOW * 2, 0))
    assert len(spans) == N and not rejected


@pytest.mark.benchmark(group="encode 1000 signals")
def test_encode_stdlib_json(benchmark: pytest.FixtureRequest) -> None:
    benchmark(lambda: [json.dumps({**t, "score": 0.5}).encode() for t in TICKS])


@pytest.mark.benchmark(group="encode 1000 signals")
def test_encode_tickserve(benchmark: pytest.FixtureRequest) -> None:
    symbols = [t["symbol"] for t in TICKS]
    ids = [t["trade_id"] for t in TICKS]
    ev = [t["event_ns"] for t in TICKS]
    scores: list[float | None] = [0.5] * N
    zeros = [0] * N
    benchmark(
        lambda: encode_signals(symbols, ids, ev, ev, zeros, zeros, NOW, "m", "1", scores, 0.5)
    )  # type: ignore[arg-type]


SIGNALS = 2000
SIGNAL_PARTITIONS = 4
TIMING_HEADER = [("t", bytes(40))]


@dataclass(frozen=True)
class SignalRows:
    """2000 signals over 4 partitions, a tenth not ready: lists as encode_signals takes
    them, and the spans into one text buffer that encode_signal_batches reads."""

    symbols: list[str]
    trade_ids: list[str]
    keys: list[bytes]
    scores: np.ndarray
    event_ns: np.ndarray
    partition: np.ndarray
    text: np.ndarray
    starts: np.ndarray  # symbols' (= keys') spans, then the trade ids'
    lens: np.ndarray

    def encode_signal_batches(self) -> list[tuple[int, bytes, int]]:
        from stream.kafka.signalbatch import encode_signal_batches

        n = SIGNALS
        return encode_signal_batches(
            self.text, sym_start=self.starts[:n], sym_len=self.lens[:n],
            key_start=self.starts[:n], key_len=self.lens[:n], tid_start=self.starts[n:],
            tid_len=self.lens[n:], event_ns=self.event_ns, recv_ns=self.event_ns + 1_000,
            tick_partition=self.partition, tick_offset=self.event_ns - NOW,
            emit_ns=NOW, model="model", version="7", scores=self.scores, threshold=0.5,
            partition=self.partition, timestamp_ms=NOW // 10**6, headers=TIMING_HEADER,
        )  # fmt: skip


def _signal_rows() -> SignalRows:
    rng = np.random.default_rng(11)
    sym = rng.integers(0, 100, SIGNALS)
    symbols = [f"SYN{i:03d}/USD" for i in sym.tolist()]
    trade_ids = [str(10_000_000 + i) for i in range(SIGNALS)]
    scores = rng.random(SIGNALS)
    scores[rng.random(SIGNALS) < 0.1] = np.nan
    names = [orjson.dumps(s)[1:-1] for s in symbols] + [t.encode() for t in trade_ids]
    lens = np.array([len(b) for b in names], np.int64)
    event_ns = NOW + np.arange(SIGNALS, dtype=np.int64) * 50_000
    text = np.frombuffer(b"".join(names), np.uint8)
    return SignalRows(symbols, trade_ids, [s.encode() for s in symbols], scores, event_ns,
                      sym % SIGNAL_PARTITIONS, text, np.cumsum(lens) - lens, lens)  # fmt: skip


@pytest.mark.benchmark(group="encode + batch 2000 signals, 4 partitions")
def test_encode_produce_batch_builder(benchmark: pytest.FixtureRequest) -> None:
    """The natural way: encode_signals, then one BatchBuilder.append per signal."""
    from aiokafka.producer.message_accumulator import BatchBuilder

    r = _signal_rows()
    scores = r.scores.tolist()
    partitions = r.partition.tolist()

    def encode_produce() -> list[bytes]:
        values = encode_signals(
            r.symbols, r.trade_ids, r.event_ns.tolist(), (r.event_ns + 1_000).tolist(),
            partitions, (r.event_ns - NOW).tolist(), NOW, "model", "7",
            [None if s != s else s for s in scores], 0.5,
        )  # fmt: skip
        builders: dict[int, BatchBuilder] = {}
        for p, key, value in zip(partitions, r.keys, values, strict=True):
            builder = builders.get(p)
            if builder is None:
                builder = builders[p] = BatchBuilder(256 * 1024, 0)
            builder.append(timestamp=NOW // 10**6, key=key, value=value, headers=TIMING_HEADER)
        return [bytes(b._build()) for b in builders.values()]

    assert len(benchmark(encode_produce)) == SIGNAL_PARTITIONS


@pytest.mark.benchmark(group="encode + batch 2000 signals, 4 partitions")
def test_encode_produce_tickserve_records(benchmark: pytest.FixtureRequest) -> None:
    """Numba writes the values into record batches; PrebuiltBatch carries each to send_batch."""
    from stream.kafka.aiokafka_adapter import PrebuiltBatch
    from stream.kafka.signalbatch import warm_up

    warm_up()
    r = _signal_rows()

    def encode_produce() -> list[PrebuiltBatch]:
        return [PrebuiltBatch(data, count) for _, data, count in r.encode_signal_batches()]

    assert len(benchmark(encode_produce)) == SIGNAL_PARTITIONS


def _signal_batch_buffer() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The record batches of `_signal_rows` back to back, with their offsets and sizes."""
    batches = _signal_rows().encode_signal_batches()
    sizes = np.array([len(data) for _, data, _ in batches], np.int64)
    buffer = np.frombuffer(b"".join(data for _, data, _ in batches), np.uint8).copy()
    return buffer, np.cumsum(sizes) - sizes, sizes


@pytest.mark.benchmark(group="crc32c of 2000 signals' record batches")
def test_crc32c_aiokafka(benchmark: pytest.FixtureRequest) -> None:
    from aiokafka.record.util import calc_crc32c

    buffer, at, sizes = _signal_batch_buffer()
    views = [buffer.data[a + 21 : a + s] for a, s in zip(at, sizes, strict=True)]
    benchmark(lambda: [calc_crc32c(v) for v in views])


@pytest.mark.parametrize("kernel", ["sse42", "tables"])
@pytest.mark.benchmark(group="crc32c of 2000 signals' record batches")
def test_crc32c_tickserve(benchmark: pytest.FixtureRequest, kernel: str) -> None:
    from stream.kafka import recordbatch as records

    if kernel == "sse42" and not records.HARDWARE_CRC:
        pytest.fail("this CPU has no SSE4.2")
    crc = records._crc_batches_sse42 if kernel == "sse42" else records._crc_batches_tables
    buffer, at, sizes = _signal_batch_buffer()
    expected = buffer.copy()
    crc(buffer, at, sizes)
    assert np.array_equal(buffer, expected)  # the batches came with these CRCs
    benchmark(crc, buffer, at, sizes)


def _feature_inputs(n: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(3)
    slots = rng.integers(0, 100, n).astype(np.int64)
    ts = np.cumsum(rng.integers(1, 4_000_000, n)).astype(np.int64)
    price = 60000.01 * np.exp(np.cumsum(rng.normal(0, 1e-4, n)))
    return slots, ts, price, rng.exponential(1.0, n), rng.random(n) < 0.5


@pytest.mark.parametrize("batch", [1, 1000])
@pytest.mark.benchmark(group="features per batch (100 symbols)")
def test_features_tickserve(benchmark: pytest.FixtureRequest, batch: int) -> None:
    engine = FeatureEngine(FeatureSpec(bar_ns=NS_PER_SECOND))
    engine.slots([f"S{i}" for i in range(100)])
    slots, ts, price, qty, side = _feature_inputs(200_000)
    engine.update(slots[:100_000], ts[:100_000], price[:100_000], qty[:100_000], side[:100_000])
    state = {"i": 100_000}

    def step() -> None:
        i = state["i"]
        if i + batch > len(ts):  # the data ran out: keep time moving forward
            ts[:] += ts[-1]
            i = 0
        engine.update(slots[i : i + batch], ts[i : i + batch], price[i : i + batch],
                      qty[i : i + batch], side[i : i + batch])  # fmt: skip
        state["i"] = i + batch

    benchmark(step)


@pytest.mark.benchmark(group="features per batch (100 symbols)")
def test_features_talipp_1000_ticks(benchmark: pytest.FixtureRequest) -> None:
    """RSI + Bollinger only (2 of tickserve's 12 features), one tick at a time."""
    from talipp.indicators import BB, RSI

    slots, ts, price, _, _ = _feature_inputs(50_000)
    rsi = [RSI(14) for _ in range(100)]
    bb = [BB(20, 2.0) for _ in range(100)]
    bar = [-1] * 100
    state = {"i": 0}

    def step() -> None:
        i = state["i"] % (len(ts) - N)
        for k in range(i, i + N):
            s, b, p = int(slots[k]), int(ts[k] // NS_PER_SECOND), float(price[k])
            if b != bar[s]:
                rsi[s].add(p)
                bb[s].add(p)
                bar[s] = b
            else:
                rsi[s].update(p)
                bb[s].update(p)
        state["i"] = i + N

    benchmark(step)


@pytest.fixture(scope="module")
def onnx_model() -> bytes:
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    X = rng.normal(size=(2000, FeatureSpec().n_features)).astype(np.float32)
    y = (X[:, 0] + rng.normal(size=2000) > 0).astype(int)
    clf = LogisticRegression().fit(X, y)
    return to_onnx(clf, X[:1], options={id(clf): {"zipmap": False}}).SerializeToString()  # type: ignore[no-any-return]


@pytest.mark.parametrize("engine", ["onnxruntime", "linear-kernel"])
@pytest.mark.parametrize("batch", [1, 64, 1024, 4096])
@pytest.mark.benchmark(group="logistic model per batch: onnx run vs inference.linear")
def test_onnx_run(
    benchmark: pytest.FixtureRequest, onnx_model: bytes, batch: int, engine: str
) -> None:
    from inference.session import OnnxScorer

    n_features = FeatureSpec().n_features
    scorer = OnnxScorer.from_bytes(onnx_model, n_features, prefer_gpu=False,
                                   numba_kernels=engine != "onnxruntime")  # fmt: skip
    assert scorer.engine == engine
    rows = np.random.default_rng(2).normal(size=(batch, n_features))
    benchmark(scorer.score, rows)


@pytest.mark.parametrize("batch", [1, 190, 1000])
@pytest.mark.parametrize("path", ["bare session.run", "MicroBatcher.score_batch"])
@pytest.mark.benchmark(group="batcher overhead over the bare session.run")
def test_batcher_overhead(
    benchmark: pytest.FixtureRequest, onnx_model: bytes, batch: int, path: str
) -> None:
    from inference.batcher import MicroBatcher
    from inference.registry import LoadedModel
    from inference.session import OnnxScorer

    n_features = FeatureSpec().n_features
    scorer = OnnxScorer.from_bytes(onnx_model, n_features, prefer_gpu=False, numba_kernels=False)
    rows = np.random.default_rng(2).normal(size=(batch, n_features))
    if path == "bare session.run":
        feed = {scorer.input_name: rows.astype(np.float32)}
        benchmark(scorer.session.run, [scorer.prob_output], feed)
        return
    batcher = MicroBatcher(LoadedModel("m", "1", "champion", "", scorer, 0), n_features)
    origin = np.full(batch, NOW)
    benchmark(batcher.score_batch, rows, origin)


@pytest.fixture(scope="module")
def feast_store(tmp_path_factory: pytest.TempPathFactory) -> object:
    from deploy.settings import Settings
    from deploy.stack import LocalStack, free_port
    from features.online import open_store

    tmp: Path = tmp_path_factory.mktemp("feast")
    settings = Settings(state_dir=tmp, valkey_port=free_port(), redis_url=None)
    stack = LocalStack(settings)
    stack.start_redis()
    yield open_store(settings.redis, settings.feast_registry)
    stack.down()


def _rows(n: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    spec = FeatureSpec()
    return ([f"S{i}" for i in range(n)], np.full(n, time.time_ns()),
            np.random.default_rng(4).normal(size=(n, spec.n_features)))  # fmt: skip


@pytest.mark.benchmark(group="online store write, 100 symbols")
def test_online_write_feast_dataframe(
    benchmark: pytest.FixtureRequest, feast_store: object
) -> None:
    import pandas as pd

    from features.feature_repo.definitions import FEATURE_VIEW

    symbols, ts, values = _rows(100)
    frame = pd.DataFrame(values, columns=list(FeatureSpec().names))
    frame.insert(0, "symbol", symbols)

    def write() -> None:
        frame["event_timestamp"] = pd.Timestamp.now(tz="UTC")
        feast_store.write_to_online_store(FEATURE_VIEW, df=frame)  # type: ignore[attr-defined]

    benchmark(write)


@pytest.mark.benchmark(group="online store write, 100 symbols")
def test_online_write_tickserve(benchmark: pytest.FixtureRequest, feast_store: object) -> None:
    from features.online import OnlineWriter

    writer = OnlineWriter(feast_store, FeatureSpec())  # type: ignore[arg-type]
    symbols, _, values = _rows(100)

    def write() -> None:
        writer.offer(symbols, np.full(100, time.time_ns()), values)
        writer.flush()

    benchmark(write)


def _record_sets() -> list[bytes]:
    """4 partitions x 7 record batches x 25 ticks (the e2e's shape)."""
    from aiokafka.record.default_records import DefaultRecordBatchBuilder

    out = []
    for _ in range(4):
        sets = []
        for b in range(7):
            builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1 << 20)
            for i in range(25):
                builder.append(i, timestamp=1, key=b"SYN%03d/USD" % (i % 100),
                               value=RAW[(b * 25 + i) % N], headers=[])  # fmt: skip
            raw = bytearray(builder.build())
            raw[0:8] = (b * 25).to_bytes(8, "big")
            sets.append(bytes(raw))
        out.append(b"".join(sets))
    return out


def _fetch_response(version: int = 4) -> bytes:
    """A Fetch response of `_record_sets`: v4 by aiokafka, v17 (flexible, topic ids) by kio."""
    if version == 4:
        from aiokafka.protocol.fetch import FetchResponse_v4

        partitions = [(p, 0, 175, 175, [], data) for p, data in enumerate(_record_sets())]
        return bytes(FetchResponse_v4(0, [("ticks", partitions)]).encode())
    import datetime
    import io
    import uuid

    from kio.schema.errors import ErrorCode
    from kio.schema.fetch.v17 import response as r
    from kio.serial import entity_writer

    response = r.FetchResponse(
        throttle_time=datetime.timedelta(0),
        error_code=ErrorCode(0),
        responses=(
            r.FetchableTopicResponse(
                topic_id=uuid.uuid4(),
                partitions=tuple(
                    r.PartitionData(
                        partition_index=p,
                        error_code=ErrorCode(0),
                        high_watermark=175,
                        aborted_transactions=None,
                        records=data,
                    )  # fmt: skip
                    for p, data in enumerate(_record_sets())
                ),
            ),
        ),
    )
    buf = io.BytesIO(b"\0")  # the response header's tagged fields
    buf.seek(1)
    entity_writer(r.FetchResponse)(buf, response)
    return buf.getvalue()


@pytest.mark.benchmark(group="fetch response, 4 partitions x 175 ticks")
def test_fetch_response_aiokafka(benchmark: pytest.FixtureRequest) -> None:
    """aiokafka's path: the response struct decoded, then a ConsumerRecord-like per record."""
    from io import BytesIO

    from aiokafka.protocol.fetch import FetchResponse_v4
    from aiokafka.record.memory_records import MemoryRecords

    body = _fetch_response()

    def parse() -> int:
        n = 0
        for _, parts in FetchResponse_v4.decode(BytesIO(body)).topics:
            for *_, records in parts:
                memory = MemoryRecords(records)
                while (batch := memory.next_batch()) is not None:
                    batch.validate_crc()
                    n += sum(1 for r in batch if r.value is not None)
        return n

    assert benchmark(parse) == 700


@pytest.mark.benchmark(group="fetch response, 4 partitions x 175 ticks")
@pytest.mark.parametrize("version", [4, 17])
def test_fetch_response_tickserve(benchmark: pytest.FixtureRequest, version: int) -> None:
    """stream.kafka.wire: the response walked, every partition parsed and CRC-checked at once."""
    from stream.kafka.protocol import parse_fetch_response
    from stream.kafka.recordbatch import first_bad_crc
    from stream.kafka.wire import parse_partitions, warm_up

    body = _fetch_response(version)
    warm_up()

    def parse() -> int:
        data = [d for _, d in parse_fetch_response(body, version)[1]]
        buf = np.frombuffer(body, np.uint8)
        cols, _, _, status, starts, ends = parse_partitions(
            buf, np.array([d.start for d in data]), np.array([d.end for d in data]),
            np.zeros(len(data), np.int64),
        )  # fmt: skip
        assert not status.any() and first_bad_crc(buf, starts, ends) < 0
        return int(cols.shape[1])

    assert benchmark(parse) == 700
