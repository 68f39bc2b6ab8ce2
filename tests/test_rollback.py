"""A champion whose scores come out non-finite too often is rolled back to its predecessor."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from features.spec import FeatureSpec
from inference.batcher import MicroBatcher, ScoreHealth
from inference.testing import loaded, make_onnx_classifier
from inference.watcher import CHAMPION, REJECTIONS, ModelWatcher, SwapEvent, WatcherConfig

SPEC = FeatureSpec()


def test_score_health_counts_only_the_serving_version() -> None:
    health = ScoreHealth("2")
    health.count("2", np.array([0.1, np.nan, np.inf, 0.9]))
    health.count("1", np.array([np.nan] * 10))  # a batch scored before the swap
    assert (health.scored, health.non_finite, health.rate) == (4, 2, 0.5)
    assert ScoreHealth("1").rate == 0.0


def test_a_failing_champion_is_rolled_back_and_refused() -> None:
    onnx = make_onnx_classifier(SPEC.n_features, "logistic", seed=3)
    old, new = (
        loaded(onnx, SPEC.n_features, version="1"),
        loaded(onnx, SPEC.n_features, version="2"),
    )
    watcher = ModelWatcher(WatcherConfig("sqlite:///unused.db", "m", min_rows_for_rate=100), SPEC)
    watcher.history.append(SwapEvent(time.time_ns(), CHAMPION, "2", "1"))
    watcher.remember(old)
    watcher.remember(new)
    batcher = MicroBatcher(new, SPEC.n_features)
    rows = np.zeros((50, SPEC.n_features))
    batcher.health.count("2", np.where(np.arange(50) % 10 == 0, np.nan, 0.5))  # 2% bad
    assert not watcher.roll_back_if_failing(batcher)  # too few rows to judge
    batcher.health.count("2", np.where(np.arange(100) % 10 == 0, np.nan, 0.5))
    rejected = REJECTIONS.labels(CHAMPION, "non_finite")._value.get()
    assert watcher.roll_back_if_failing(batcher)
    assert batcher.model.version == "1"
    assert REJECTIONS.labels(CHAMPION, "non_finite")._value.get() == rejected + 1
    assert watcher.history[-1] == dataclasses.replace(
        watcher.history[-1], version="1", previous="2"
    )
    assert batcher.score_batch(rows, np.zeros(50, np.int64)).model.version == "1"
    assert watcher.refused(CHAMPION) == "2"  # the alias must move before "2" serves again
    watcher.close()


def test_a_healthy_champion_stays() -> None:
    onnx = make_onnx_classifier(SPEC.n_features, "logistic", seed=3)
    model = loaded(onnx, SPEC.n_features, version="2")
    watcher = ModelWatcher(WatcherConfig("sqlite:///unused.db", "m", min_rows_for_rate=10), SPEC)
    batcher = MicroBatcher(model, SPEC.n_features)
    batcher.health.count("2", np.full(1000, 0.5))
    batcher.health.count("2", np.array([np.nan] * 5))  # 0.5%: under the 1% default
    assert not watcher.roll_back_if_failing(batcher)
    assert batcher.model is model
    watcher.close()
