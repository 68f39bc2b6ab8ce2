"""A model's memory is released once the service swaps away from it (measured RSS)."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref

import numpy as np
import pytest

from deploy.settings import Settings
from features.spec import FeatureSpec
from inference.batcher import MicroBatcher
from inference.registry import open_client
from inference.testing import (
    golden_for,
    loaded,
    make_onnx_classifier,
    register_version,
    with_ballast,
)
from inference.watcher import CHAMPION, ModelWatcher, SwapEvent, WatcherConfig
from tests.helpers import unique

SPEC = FeatureSpec()
BALLAST = 200 * 2**20  # bytes of initializer the big version carries


def rss_bytes() -> int:
    """Resident set size of this process."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_only_the_champion_its_fallback_and_the_challenger_stay_loaded() -> None:
    onnx = make_onnx_classifier(SPEC.n_features, "logistic", seed=3)
    models = {v: loaded(onnx, SPEC.n_features, version=v) for v in "1234"}
    watcher = ModelWatcher(WatcherConfig("sqlite:///unused.db", "m"), SPEC)
    for model in models.values():
        watcher.remember(model)
    batcher = MicroBatcher(models["3"], SPEC.n_features, challenger=models["4"])
    watcher.history += [
        SwapEvent(time.time_ns(), CHAMPION, "2", "1"),
        SwapEvent(time.time_ns(), CHAMPION, "3", "2"),
    ]
    assert watcher.fallback() == "2"
    watcher.release(batcher)
    assert sorted(watcher._checked) == ["2", "3", "4"]  # "1" neither serves nor is the fallback
    batcher.swap(models["2"])  # back to the version "3" replaced: a rollback
    batcher.set_challenger(None)
    watcher.history.append(SwapEvent(time.time_ns(), CHAMPION, "2", "3"))
    assert watcher.fallback() is None
    watcher.release(batcher)
    assert sorted(watcher._checked) == ["2"]
    watcher.close()


@pytest.mark.services
@pytest.mark.timeout(900)  # logging and loading a 200 MB model through MLflow, twice
def test_rolling_back_from_a_big_version_gives_its_memory_back(stack_settings: Settings) -> None:
    """v1 -> v2 (a 200 MB initializer) -> v1 through the registry: RSS falls back."""
    uri, name, n = stack_settings.mlflow_uri, unique("memory"), SPEC.n_features
    spec_hash = stack_settings.feature_spec.hash
    base = make_onnx_classifier(n, "logistic", seed=1)
    small = register_version(uri, name, base, spec_hash, golden_for(base, n), alias=CHAMPION)
    heavy = with_ballast(base, BALLAST)
    big = register_version(uri, name, heavy, spec_hash, golden_for(heavy, n))
    del heavy
    client = open_client(uri)
    config = WatcherConfig(uri, name, prefer_gpu=False, numba_kernels=False)
    watcher = ModelWatcher(config, stack_settings.feature_spec)
    batcher = MicroBatcher(watcher.load_initial(), n)
    rows = np.random.default_rng(5).normal(size=(500, n)).astype(np.float32)
    origin = np.zeros(len(rows), np.int64)

    def swap_to(version: str) -> None:
        client.set_registered_model_alias(name, CHAMPION, version)
        asyncio.run(watcher.poll_once(batcher))
        assert batcher.model.version == version
        batcher.score_batch(rows, origin)
        gc.collect()

    try:
        swap_to(small)
        before = rss_bytes()
        swap_to(big)
        session = weakref.ref(batcher.model.scorer.session)
        loaded_big = rss_bytes()
        swap_to(small)
        after = rss_bytes()
    finally:
        watcher.close()
    mb = 2**20
    figures = f"RSS {before / mb:.0f} -> {loaded_big / mb:.0f} -> {after / mb:.0f} MB"
    print(figures)  # shown with -s
    assert loaded_big - before > 0.8 * BALLAST, f"the big version did not load? {figures}"
    assert session() is None, "something still holds the big version's session"
    assert after - before < 0.3 * BALLAST, f"its memory was not given back: {figures}"
