"""Hot swap on the real broker and MLflow: nothing dropped or doubled, bad versions never serve."""

from __future__ import annotations

import asyncio
import bisect
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import orjson
import pytest

from deploy.compose import build_service
from deploy.settings import Settings
from features.engine import compute_features
from features.spec import FeatureSpec
from inference.batcher import MicroBatcher
from inference.registry import open_client
from inference.testing import (
    golden_for,
    loaded,
    make_onnx_classifier,
    poison_with_nan,
    register_version,
)
from inference.watcher import REJECTIONS, ModelWatcher
from stream.contracts.signal import Signal
from stream.ingest.feed import Pacing, publish, read_trades
from stream.kafka.clients import ensure_topics
from stream.worker import StreamWorker
from tests.helpers import TRADES, LoopThread, read_topic, run, unique

pytestmark = pytest.mark.services
N_FEATURES = FeatureSpec().n_features


@dataclass
class Registry:
    settings: Settings
    onnx: dict[str, bytes]  # version -> model bytes
    good: list[str]
    bad: dict[str, str]  # expected rejection reason -> version


@pytest.fixture(scope="module")
def registry(stack_settings: Settings) -> Registry:
    """Three good versions and four that must never serve, all under one model name."""
    settings = stack_settings.model_copy(update={"model_name": unique("hotswap")})
    uri, name, spec_hash = settings.mlflow_uri, settings.model_name, settings.feature_spec.hash
    onnx: dict[str, bytes] = {}
    good = []
    for kind, seed, params in (("logistic", 1, {}), ("logistic", 2, {"C": 0.01}),
                               ("hgb", 3, {"max_iter": 30})):  # fmt: skip
        model = make_onnx_classifier(N_FEATURES, kind, seed=seed, **params)  # type: ignore[arg-type]
        version = register_version(uri, name, model, spec_hash, golden_for(model, N_FEATURES))
        onnx[version] = model
        good.append(version)
    base = onnx[good[0]]
    wrong_golden = golden_for(base, N_FEATURES)
    wrong_golden["p_up"][0] += 1e-3
    bad = {
        "spec_hash": register_version(uri, name, base, "0123456789abcdef",
                                      golden_for(base, N_FEATURES)),
        "golden": register_version(uri, name, base, spec_hash, wrong_golden),
        "nonfinite": register_version(uri, name, poison_with_nan(base), spec_hash,
                                      golden_for(base, N_FEATURES)),
        "golden_missing": register_version(uri, name, base, spec_hash, None),
    }  # fmt: skip
    return Registry(settings, onnx, good, bad)


@dataclass
class Served:
    settings: Settings
    worker: StreamWorker
    watcher: ModelWatcher
    batcher: MicroBatcher
    set_alias: Callable[[str, str], None]
    shadow_topic: str


@pytest.fixture
def served(
    registry: Registry, topics: Settings, request: pytest.FixtureRequest
) -> Iterator[Served]:
    """Worker + watcher on one event loop, champion at the first good version.

    Indirect parameter: the batcher's staleness deadline in ns (default 0: never stale).
    """
    settings = topics.model_copy(update={"model_name": registry.settings.model_name})
    client = open_client(settings.mlflow_uri)

    def set_alias(alias: str, version: str) -> None:
        client.set_registered_model_alias(settings.model_name, alias, version)

    set_alias("champion", registry.good[0])
    if "challenger" in client.get_registered_model(settings.model_name).aliases:
        client.delete_registered_model_alias(settings.model_name, "challenger")
    shadow = unique("shadow")
    run(ensure_topics(settings.bootstrap, [settings.ticks_topic, settings.signals_topic,
                                           settings.dlq_topic, shadow], 4))  # fmt: skip
    stale_ns = getattr(request, "param", 0)
    settings = settings.model_copy(
        update={
            "challenger_alias": "challenger",
            "shadow_topic": shadow,
            "model_poll_s": 0.05,
            "prefer_gpu": False,
            "max_batch": 500,
            "stale_ms": stale_ns // 1_000_000,
        }
    )
    service = build_service(settings, online_store=False)
    worker, watcher, batcher = service.worker, service.watcher, service.batcher
    loop = LoopThread()
    stop: asyncio.Event = loop.submit(_event()).result(5)  # type: ignore[attr-defined]
    done = loop.submit(service.run(stop))
    try:
        yield Served(settings, worker, watcher, batcher, set_alias, shadow)
    finally:
        loop.loop.call_soon_threadsafe(stop.set)
        done.result(30)  # type: ignore[attr-defined]
        loop.close()


async def _event() -> asyncio.Event:
    return asyncio.Event()


def _wait(cond: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _publisher(settings: Settings, ticks: list[dict[str, object]], rate: float) -> threading.Thread:
    thread = threading.Thread(
        target=lambda: run(
            publish(ticks, settings.bootstrap, settings.ticks_topic, Pacing(rate=rate))
        ),  # fmt: skip
        daemon=True,
    )
    thread.start()
    return thread


def _expected_scores(
    ticks: list[dict[str, object]], settings: Settings, onnx: dict[str, bytes]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Offline features (same kernels) and each version's scores for every tick."""
    feats = compute_features(
        settings.feature_spec,
        [t["symbol"] for t in ticks],  # type: ignore[misc]
        np.array([t["event_ns"] for t in ticks], np.int64),
        np.array([t["price"] for t in ticks], np.float64),
        np.array([t["quantity"] for t in ticks], np.float64),
        np.array([t["side"] == "buy" for t in ticks]),
    )
    scores = {}
    for version, model in onnx.items():
        out = np.full(len(ticks), np.nan)
        out[feats.ready] = loaded(model, N_FEATURES).scorer.score(feats.values[feats.ready])
        scores[version] = out
    return feats.ready, scores


def test_ten_champion_swaps_under_load_drop_and_double_nothing(
    served: Served, registry: Registry
) -> None:
    settings, batcher = served.settings, served.batcher
    ticks = read_trades(TRADES)[:6000]
    ready, expected = _expected_scores(ticks, settings, registry.onnx)
    _wait(served.worker.assigned.is_set, "partition assignment", 60)
    publisher = _publisher(settings, ticks, rate=1000.0)
    _wait(lambda: served.worker.processed > 400, "the first ticks")

    targets = [registry.good[(i + 1) % 3] for i in range(10)]  # 2,3,1,2,3,1,... and back
    engines = {}
    for version in targets:
        served.set_alias("champion", version)
        _wait(lambda v=version: batcher.model.version == v, f"swap to v{version}")  # type: ignore[misc]
        engines[version] = batcher.model.scorer.engine
        time.sleep(0.15)  # let some signals through on this version
    publisher.join(60)
    assert not publisher.is_alive()

    records = run(read_topic(settings.bootstrap, settings.signals_topic, 4, len(ticks), 120))
    signals = [Signal.decode(r.value) for r in records]  # type: ignore[attr-defined]
    per_tick = Counter(s.trade_id for s in signals)
    assert len(per_tick) == len(ticks), "a tick got no signal"
    assert max(per_tick.values()) == 1, "a tick got two signals"

    swaps = [e for e in served.watcher.history if e.role == "champion"]
    assert [e.version for e in swaps] == targets
    times = [e.at_ns for e in swaps]
    serving = [registry.good[0], *targets]
    index = {str(t["trade_id"]): i for i, t in enumerate(ticks)}
    scored = sorted((s for s in signals if s.ready), key=lambda s: s.emit_ns)
    assert len(scored) == int(ready.sum())
    for s in scored:
        # the version named is the one that was champion when the signal was made ...
        assert s.version == serving[bisect.bisect_right(times, s.emit_ns)]
        # ... and really is the one that scored it
        assert s.score == pytest.approx(expected[s.version][index[s.trade_id]], abs=1e-6)
    runs = 1 + sum(a.version != b.version for a, b in zip(scored, scored[1:], strict=False))
    assert runs >= 8, f"only {runs} version runs among signals: swaps did not happen under load"
    # the gradient-boosted version was swapped in with its tree kernel, compiled apart
    assert engines[registry.good[2]] == "tree-kernel"
    # versions neither serving nor the fallback were released (docs/architecture.md)
    assert sorted(served.watcher._checked) == sorted({targets[-1], targets[-2]})


def test_bad_versions_never_serve_and_a_challenger_only_shadows(
    served: Served, registry: Registry
) -> None:
    settings, batcher = served.settings, served.batcher
    first = registry.good[0]
    ticks = read_trades(TRADES)[:3000]
    _wait(served.worker.assigned.is_set, "partition assignment", 60)
    publisher = _publisher(settings, ticks, rate=1000.0)
    _wait(lambda: served.worker.processed > 200, "the first ticks")
    served.set_alias("challenger", registry.good[1])
    _wait(lambda: batcher.challenger is not None, "the challenger")

    for reason, version in registry.bad.items():
        before = REJECTIONS.labels("champion", reason)._value.get()
        served.set_alias("champion", version)
        _wait(lambda r=reason, b=before: REJECTIONS.labels("champion", r)._value.get() > b,
              f"rejection of v{version} ({reason})")  # fmt: skip
        assert batcher.model.version == first
    served.set_alias("champion", first)  # the rollback to a version that kept serving
    publisher.join(60)

    signals = [Signal.decode(r.value) for r in run(  # type: ignore[attr-defined]
        read_topic(settings.bootstrap, settings.signals_topic, 4, len(ticks), 120))]  # fmt: skip
    assert len({s.trade_id for s in signals}) == len(ticks) == len(signals)
    assert {s.version for s in signals if s.ready} == {first}
    assert not any(e.role == "champion" for e in served.watcher.history)

    # shadow signals carry the challenger's version and go only to the shadow topic
    shadow = [Signal.decode(r.value) for r in run(  # type: ignore[attr-defined]
        read_topic(settings.bootstrap, served.shadow_topic, 4, 1, 30))]  # fmt: skip
    assert shadow and {s.version for s in shadow} == {registry.good[1]}
    challenged = {s.trade_id for s in shadow}
    assert challenged <= {s.trade_id for s in signals if s.ready}


async def _publish_old(settings: Settings, ticks: list[dict[str, object]], age_s: float) -> None:
    """Ticks whose feed receive time is `age_s` in the past (as after a long stall)."""
    from stream.kafka.clients import make_producer

    producer = make_producer(settings.bootstrap)
    await producer.start()
    try:
        recv_ns = time.time_ns() - int(age_s * 1e9)
        acks = [
            await producer.send(settings.ticks_topic, orjson.dumps({**t, "recv_ns": recv_ns}),
                                key=str(t["symbol"]).encode())
            for t in ticks
        ]  # fmt: skip
        await asyncio.gather(*acks)
    finally:
        await producer.stop()


@pytest.mark.parametrize("served", [5_000_000_000], indirect=True)
def test_stale_ticks_are_dead_lettered_not_scored(served: Served) -> None:
    settings = served.settings
    ticks = read_trades(TRADES)[:2000]
    ready, _ = _expected_scores(ticks, settings, {})
    _wait(served.worker.assigned.is_set, "partition assignment", 60)
    run(_publish_old(settings, ticks[:1000], age_s=30.0))
    run(publish(ticks[1000:], settings.bootstrap, settings.ticks_topic))

    n_stale = int(ready[:1000].sum())
    n_signals = len(ticks) - n_stale
    signals = [Signal.decode(r.value) for r in run(  # type: ignore[attr-defined]
        read_topic(settings.bootstrap, settings.signals_topic, 4, n_signals, 120))]  # fmt: skip
    dead = run(read_topic(settings.bootstrap, settings.dlq_topic, 4, n_stale, 60))
    assert n_stale > 500
    assert (len(signals), len(dead)) == (n_signals, n_stale)  # type: ignore[arg-type]
    assert {dict(r.headers)["reason"] for r in dead} == {b"stale"}  # type: ignore[attr-defined]
    stale_ids = {orjson.loads(r.value)["trade_id"] for r in dead}  # type: ignore[attr-defined]
    by_id = {s.trade_id: s for s in signals}
    assert stale_ids.isdisjoint(by_id) and len(stale_ids | set(by_id)) == len(ticks)
    old = [by_id[str(t["trade_id"])] for t in ticks[:1000] if str(t["trade_id"]) in by_id]
    assert all(not s.ready for s in old)  # only the not-yet-ready ticks of the old ones
    assert sum(s.ready for s in signals) == int(ready[1000:].sum())
