"""Honest health: /ready says "stalled" when lag stops moving, and why it is not ready."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import numpy as np
import pytest
from aiokafka import TopicPartition
from prometheus_client import REGISTRY

from deploy.compose import build_service
from deploy.settings import Settings
from deploy.stack import free_port
from features.spec import FeatureSpec
from inference.api import ApiContext, create_app, serve_http_apart
from inference.batcher import BatcherConfig, MicroBatcher
from inference.testing import golden_for, loaded, make_onnx_classifier, register_version
from stream.ingest.feed import Pacing, publish, read_trades
from stream.kafka.fetched import Fetched
from stream.kafka.testing import fetched_of
from stream.worker.health import ProgressWatch
from tests.helpers import TRADES, LoopThread, fresh, run, unique

TP0, TP1 = TopicPartition("ticks", 0), TopicPartition("ticks", 1)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lag_that_does_not_move_is_a_stall_and_idle_is_not() -> None:
    clock = Clock()
    watch = ProgressWatch(10.0, clock)
    watch.observe({TP0: 5, TP1: 3}, {TP0: 0, TP1: 0})
    clock.now += 60
    assert watch.reason() is None  # quiet, but nothing to do
    watch.observe({TP0: 5, TP1: 3}, {TP0: 0, TP1: 0})
    watch.observe({TP0: 5, TP1: 3}, {TP0: 7})  # ticks arrive on partition 0
    clock.now += 9
    assert watch.reason() is None
    watch.observe({TP0: 5, TP1: 3}, {})  # fetches bring nothing: the lag stays known
    clock.now += 2
    assert watch.reason() == "stalled: no progress for 11 s while partition 0 lags 7 records"
    watch.observe({TP0: 12, TP1: 3}, {TP0: 0})  # it advanced and caught up
    assert watch.reason() is None


def test_a_moving_position_is_progress_even_with_lag() -> None:
    clock = Clock()
    watch = ProgressWatch(10.0, clock)
    for step in range(5):
        clock.now += 8
        watch.observe({TP0: 100 * step}, {TP0: 5000, TP1: 2})
        assert watch.reason() is None
    clock.now += 10.5
    assert watch.reason() == "stalled: no progress for 10 s while partitions 0, 1 lag 5002 records"
    watch.restart()  # a new assignment: restoring is not stalling
    assert watch.reason() is None
    watch.forget([TP0, TP1])
    clock.now += 60
    assert watch.reason() is None


@pytest.fixture
def served(stack_settings: Settings) -> Iterator[tuple[Settings, object]]:
    """`tickserve serve`'s service on the real broker, its HTTP API on a free port."""
    name = unique("health")
    n = FeatureSpec().n_features
    model = make_onnx_classifier(n, "logistic", seed=1)
    spec_hash = stack_settings.feature_spec.hash
    register_version(stack_settings.mlflow_uri, name, model, spec_hash, golden_for(model, n),
                     alias="champion")  # fmt: skip
    settings = fresh(
        stack_settings,
        model_name=name,
        http_port=free_port(),
        stall_after_s=2.0,
        prefer_gpu=False,
        # no tree-kernel compiler child: under load its start outlasts the teardown
        # (ModelWatcher.close waits for it on the loop)
        numba_kernels=False,
        partitions=2,
    )
    service = build_service(settings, online_store=False)
    loop = LoopThread()
    stop: asyncio.Event = loop.submit(_event()).result(5)  # type: ignore[attr-defined]
    done = loop.submit(service.run(stop))
    try:
        yield settings, service.worker
    finally:
        loop.loop.call_soon_threadsafe(stop.set)
        done.result(30)  # type: ignore[attr-defined]
        loop.close()


async def _event() -> asyncio.Event:
    return asyncio.Event()


def _wait(cond: Callable[[], bool], what: str, timeout_s: float) -> float:
    """Wait for `cond`; returns the seconds it took."""
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < timeout_s, f"timed out waiting for {what}"
        time.sleep(0.05)
    return time.monotonic() - start


def test_a_blocked_stream_with_lag_is_not_ready_until_it_resumes(
    served: tuple[Settings, object],
) -> None:
    settings, worker = served
    url = f"http://127.0.0.1:{settings.http_port}/ready"

    def ready() -> dict[str, object]:
        answer = httpx.get(url, timeout=5)
        body: dict[str, object] = answer.json()
        assert answer.status_code == (200 if body["ready"] else 503)
        return body

    _wait(worker.assigned.is_set, "partition assignment", 90)  # type: ignore[attr-defined]
    ticks = read_trades(TRADES)[:3000]
    run(publish(ticks[:1000], settings.bootstrap, settings.ticks_topic))
    _wait(lambda: worker.processed >= 1000, "the first ticks", 60)  # type: ignore[attr-defined]
    _wait(lambda: ready()["ready"] is True, "ready", 10)

    # the test hook: fetches come back empty, as from a broker that stopped serving them
    blocked = threading.Event()
    source = worker.source  # type: ignore[attr-defined]
    real_poll = source.poll

    async def poll(timeout_ms: int) -> Fetched:
        if blocked.is_set():
            await asyncio.sleep(timeout_ms / 1000)
            return fetched_of(settings.ticks_topic, [])
        fetched: Fetched = await real_poll(timeout_ms)
        return fetched

    source.poll = poll
    blocked.set()
    time.sleep(0.3)  # a poll in flight before the hook still lands
    held = worker.processed  # type: ignore[attr-defined]
    sender = threading.Thread(
        target=run,
        args=(publish(ticks[1000:], settings.bootstrap, settings.ticks_topic, Pacing(rate=500)),),
    )
    sender.start()
    took = _wait(lambda: ready()["ready"] is False, "/ready to turn false", 15)
    body = ready()
    reason = str(body["reason"])
    assert reason.startswith("stalled: no progress for"), body
    assert " lag" in reason
    # within N seconds of the stall, plus the lag probe's interval (N/2) and a poll
    assert took <= settings.stall_after_s + settings.stall_after_s / 2 + 2.0, took
    assert worker.processed == held  # type: ignore[attr-defined]
    lags = [
        REGISTRY.get_sample_value(
            "consumer_lag", {"topic": settings.ticks_topic, "partition": str(p)}
        )
        for p in range(2)
    ]
    assert sum(v or 0 for v in lags) > 0, lags
    stamp = REGISTRY.get_sample_value("last_progress_timestamp_seconds")
    assert stamp is not None and time.time() - stamp >= settings.stall_after_s

    blocked.clear()
    sender.join(30)
    _wait(lambda: worker.processed >= 3000, "the held ticks", 60)  # type: ignore[attr-defined]
    _wait(lambda: ready()["ready"] is True, "/ready to turn true again", 15)
    assert ready()["reason"] is None


def test_the_api_on_its_own_thread_reads_the_stream_on_the_stream_loop() -> None:
    """serve_http_apart: requests are parsed on the API's thread; state is read on the stream's."""
    n = 4
    batcher = MicroBatcher(loaded(make_onnx_classifier(n, "logistic", seed=4), n), n,
                           BatcherConfig(max_batch=16, max_delay_us=200))  # fmt: skip
    stream = LoopThread()
    on: list[int] = []

    def latest(symbol: str) -> tuple[int, np.ndarray] | None:
        on.append(threading.get_ident())
        return (7, np.full(n, 0.5, np.float32)) if symbol == "A" else None

    def reason() -> str | None:
        on.append(threading.get_ident())
        return "stalled: as a test says"

    ctx = ApiContext(batcher, ("a", "b", "c", "d"), latest, lambda: True,
                     stream_not_ready=reason, stream_loop=stream.loop)  # fmt: skip
    port = free_port()
    stop: asyncio.Event = stream.submit(_event()).result(5)  # type: ignore[attr-defined]
    done = stream.submit(serve_http_apart(create_app(ctx), "127.0.0.1", port, stop))
    base = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _answers(f"{base}/health"), "the API", 20)
        by_symbol = httpx.post(f"{base}/predict", json={"symbol": "A"}, timeout=5)
        assert by_symbol.status_code == 200 and by_symbol.json()["features_event_ns"] == 7
        by_row = httpx.post(f"{base}/predict", json={"features": [0.5] * n}, timeout=5)
        assert by_row.json()["score"] == by_symbol.json()["score"]
        assert httpx.post(f"{base}/predict", json={"symbol": "B"}, timeout=5).status_code == 404
        ready = httpx.get(f"{base}/ready", timeout=5)
        assert (ready.status_code, ready.json()["reason"]) == (503, "stalled: as a test says")
        assert on and set(on) == {stream.thread.ident}  # never on the API's own thread
    finally:
        stream.loop.call_soon_threadsafe(stop.set)
        done.result(20)  # type: ignore[attr-defined]
        stream.close()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
