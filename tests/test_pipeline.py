"""The whole path through the real broker, Redis (via Feast), ClickHouse engine and MLflow."""

from __future__ import annotations

import asyncio
import importlib
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploy.compose import build_service
from deploy.stack import free_port
from features.online import open_store, read_online
from features.spec import FeatureSpec
from inference.registry import load_model
from stream.contracts.signal import FLAT, Signal
from stream.ingest.feed import publish
from stream.worker import StreamWorker
from tests.helpers import (
    HISTORY,
    LoopThread,
    Pipeline,
    fresh,
    read_topic,
    run,
    table_mismatches,
)
from tickserve.errors import ModelNotFound, ModelRejected

# docs/metrics.md lists the monitor's and the live ingest's metrics too: this process
# serves them once their modules are loaded (an earlier test may load them); load them
# here so the check below does not depend on the order tests run in
for _module in ("stream.monitor.app", "stream.ingest.live"):
    importlib.import_module(_module)

pytestmark = pytest.mark.services


def test_onnx_scores_equal_the_trained_model(pipeline: Pipeline) -> None:
    result = pipeline.result
    assert len(result.native_scores) > 100
    np.testing.assert_allclose(result.onnx_scores, result.native_scores, rtol=0, atol=1e-5)
    # and the version served from the registry scores the same
    settings = pipeline.settings
    served = load_model(settings.mlflow_uri, settings.model_name, "champion",
                        settings.feature_spec, prefer_gpu=False)  # fmt: skip
    assert served.version == result.version
    np.testing.assert_allclose(
        served.scorer.score(result.X_test), result.native_scores, rtol=0, atol=1e-5
    )


def test_a_model_for_another_feature_spec_is_refused(pipeline: Pipeline) -> None:
    settings = pipeline.settings
    with pytest.raises(ModelRejected, match="FeatureSpec"):
        load_model(settings.mlflow_uri, settings.model_name, "champion",
                   FeatureSpec(bar_ns=1_000_000_000), prefer_gpu=False)  # fmt: skip
    with pytest.raises(ModelNotFound, match="tickserve train"):
        load_model(settings.mlflow_uri, settings.model_name, "no-such-alias",
                   settings.feature_spec, prefer_gpu=False)  # fmt: skip


BAD_RECORDS = [
    (b"not json at all", "decode"),
    (orjson.dumps({"symbol": "XRP/ETH", "event_ns": 1, "price": None, "quantity": 1.0,
                   "side": "buy", "trade_id": "bad-1", "recv_ns": 1}), "schema"),
    (orjson.dumps({"symbol": "XRP/ETH", "event_ns": 1, "price": -2.0, "quantity": 1.0,
                   "side": "buy", "trade_id": "bad-2", "recv_ns": 1}), "price"),
    (orjson.dumps({"symbol": "XRP/ETH", "event_ns": 1, "price": 2.0, "quantity": -1.0,
                   "side": "buy", "trade_id": "bad-3", "recv_ns": 1}), "quantity"),
    (orjson.dumps({"symbol": "XRP/ETH", "event_ns": time.time_ns() + 3600 * 10**9, "price": 2.0,
                   "quantity": 1.0, "side": "buy", "trade_id": "bad-4", "recv_ns": 1}), "future"),
]  # fmt: skip


@pytest.fixture
def served(pipeline: Pipeline) -> Iterator[tuple[StreamWorker, Pipeline]]:
    """A worker in its own event loop thread, exactly as `tickserve serve` wires it."""
    service = build_service(pipeline.settings)
    loop = LoopThread()
    stop: asyncio.Event = loop.submit(_make_event()).result(5)  # type: ignore[attr-defined]
    done = loop.submit(service.run(stop))
    try:
        yield service.worker, pipeline
    finally:
        loop.loop.call_soon_threadsafe(stop.set)
        # the model watcher's stop can wait for its kernel compiler child to answer its first
        # ping (a niced process importing numba: 46 s at a load of 16)
        done.result(120)  # type: ignore[attr-defined]
        loop.close()


async def _make_event() -> asyncio.Event:
    return asyncio.Event()


async def _publish_raw(bootstrap: str, topic: str, values: list[bytes]) -> None:
    from stream.kafka.clients import make_producer

    producer = make_producer(bootstrap)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, key=b"XRP/ETH")
    finally:
        await producer.stop()


def test_every_tick_gets_one_signal_and_bad_ones_go_to_the_dlq(
    served: tuple[StreamWorker, Pipeline],
) -> None:
    worker, pipeline = served
    settings = pipeline.settings
    live = pipeline.ticks[HISTORY:]
    # bad records in the middle of the stream: the worker must carry on past them
    run(publish(live[:1000], settings.bootstrap, settings.ticks_topic))
    run(_publish_raw(settings.bootstrap, settings.ticks_topic, [v for v, _ in BAD_RECORDS]))
    run(publish(live[1000:], settings.bootstrap, settings.ticks_topic))
    total = len(pipeline.ticks)

    def every_tick(records: list[Any]) -> bool:
        return len({_tick_of(r.value) for r in records}) >= total

    records = run(read_topic(settings.bootstrap, settings.signals_topic, 4, total, 120,
                             every_tick))  # fmt: skip
    signals = _one_per_tick(records)  # type: ignore[arg-type]
    per_tick = Counter(s.trade_id for s in signals)
    assert len(per_tick) == total, "a tick got no signal"
    assert max(per_tick.values()) == 1, "two ticks share a (partition, offset)"
    assert per_tick.keys() == {t["trade_id"] for t in pipeline.ticks}
    scored = [s for s in signals if s.ready]
    assert len(scored) > 0.9 * total
    assert {s.version for s in scored} == {pipeline.result.version}
    assert {s.model for s in signals} == {settings.model_name}
    assert all(s.direction == FLAT and s.score is None for s in signals if not s.ready)
    assert all(0.0 <= s.score <= 1.0 for s in scored)  # type: ignore[operator]

    dead = run(read_topic(settings.bootstrap, settings.dlq_topic, 4, len(BAD_RECORDS), 60))
    got = sorted((r.value, dict(r.headers)["reason"].decode()) for r in dead)  # type: ignore[attr-defined]
    assert got == sorted(BAD_RECORDS)

    # the online store holds what the worker computed last, read through Feast
    deadline = time.monotonic() + 10
    while worker.writer is not None and worker.writer.flushed_rows == 0:
        assert time.monotonic() < deadline, "online writer never flushed"
        time.sleep(0.05)
    worker.writer.close()  # type: ignore[union-attr]
    latest = worker.latest("XRP/ETH")
    assert latest is not None
    event_ns, expected = latest
    store = open_store(settings.redis, settings.feast_registry)
    online = read_online(store, ["XRP/ETH"], settings.feature_spec)
    got_values = online[list(settings.feature_spec.names)].to_numpy()[0]
    np.testing.assert_array_equal(got_values, expected)
    assert event_ns == max(t["event_ns"] for t in pipeline.ticks)  # type: ignore[type-var]


def _tick_of(value: bytes) -> tuple[int, int]:
    signal = Signal.decode(value)
    return signal.partition, signal.offset


def _one_per_tick(records: list[Any]) -> list[Signal]:
    """The signals, one per tick's (partition, offset): at-least-once delivery may repeat one.

    A repeat must be the same record byte for byte (a produce retried after a lost
    answer, the README's guarantee), never a tick scored twice (another emit time, or
    another score).
    """
    first: dict[tuple[int, int], bytes] = {}
    for r in records:
        value = r.value
        kept = first.setdefault(_tick_of(value), value)
        assert kept == value, f"scored twice: {Signal.decode(kept)} != {Signal.decode(value)}"
    return [Signal.decode(v) for v in first.values()]


def _scrape(url: str) -> dict[str, Any]:
    """GET /metrics, parsed: family name -> family."""
    text = httpx.get(url, timeout=10).text
    return {family.name: family for family in text_string_to_metric_families(text)}


def _value(families: dict[str, Any], sample: str, **labels: str) -> float:
    family = families[sample.removesuffix("_total").removesuffix("_count")]
    return sum(
        s.value
        for s in family.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_metrics_count_every_scored_tick(pipeline: Pipeline) -> None:
    """After a stream through the served worker, /metrics shows the seed metrics with data.

    predictions_total{model,symbol} and the count of prediction_latency_seconds each
    grow by the number of signals that carry a score; the scrape matches docs/metrics.md.
    """
    settings = fresh(pipeline.settings, http_host="127.0.0.1", http_port=free_port())
    url = f"http://127.0.0.1:{settings.http_port}/metrics"
    service = build_service(settings, online_store=False)
    loop = LoopThread()
    stop: asyncio.Event = loop.submit(_make_event()).result(5)  # type: ignore[attr-defined]
    done = loop.submit(service.run(stop))
    try:
        deadline = time.monotonic() + 60
        while not service.worker.assigned.is_set():
            assert time.monotonic() < deadline, "the worker never got its partitions"
            time.sleep(0.05)
        model = {"model": settings.model_name}
        before = _scrape(url)
        ticks = pipeline.ticks[:3000]
        run(publish(ticks, settings.bootstrap, settings.ticks_topic))
        records = run(read_topic(settings.bootstrap, settings.signals_topic, 4, len(ticks), 120))
        scored = sum(Signal.decode(r.value).ready for r in records)  # type: ignore[attr-defined]
        assert scored > 0
        deadline = time.monotonic() + 10  # the last batch's metrics follow its produce
        while True:
            after = _scrape(url)
            latency = _value(after, "prediction_latency_seconds_count") - _value(
                before, "prediction_latency_seconds_count"
            )
            if latency >= scored or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        predicted = _value(after, "predictions_total", **model, symbol="XRP/ETH") - _value(
            before, "predictions_total", **model, symbol="XRP/ETH"
        )
        assert (predicted, latency) == (scored, scored)
        stages = {s.labels["stage"] for s in after["stage_latency_seconds"].samples}
        assert stages == {"decode", "features", "score", "produce"}
        assert _value(after, "ticks_total") - _value(before, "ticks_total") == len(ticks)
        build = after["tickserve_build_info"].samples
        assert [(s.labels["model"], s.labels["model_version"]) for s in build] == [
            (settings.model_name, pipeline.result.version)
        ]
        lag = after["consumer_lag"].samples
        assert {s.labels["topic"] for s in lag} == {settings.ticks_topic}
        assert all(s.value == 0 for s in lag)  # every tick was read
        assert after["last_progress_timestamp_seconds"].samples[0].value > 0
        assert table_mismatches(after.values()) == []
    finally:
        loop.loop.call_soon_threadsafe(stop.set)
        # the model watcher's stop can wait for its kernel compiler child to answer its first
        # ping (a niced process importing numba: 46 s at a load of 16)
        done.result(120)  # type: ignore[attr-defined]
        loop.close()
