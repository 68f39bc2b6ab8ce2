"""Feature update cost per micro-batch (pytest-benchmark; fixed seed, synthetic ticks)."""

from __future__ import annotations

import numpy as np
import pytest

from features.engine import FeatureEngine
from features.spec import NS_PER_SECOND, FeatureSpec

SYMBOLS = 100


def _ticks(n: int, seed: int = 7) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    slots = rng.integers(0, SYMBOLS, n)
    ts = np.cumsum(rng.integers(1, 2_000_000, n)).astype(np.int64)
    price = 60000.01 * np.exp(np.cumsum(rng.normal(0, 1e-4, n)))
    qty = rng.exponential(1.0, n)
    side = rng.random(n) < 0.5
    return slots, ts, price, qty, side


@pytest.mark.parametrize("batch", [1, 100, 1000])
def test_feature_update(benchmark: pytest.FixtureRequest, batch: int) -> None:
    spec = FeatureSpec(bar_ns=NS_PER_SECOND)
    engine = FeatureEngine(spec)
    engine.slots([f"S{i}" for i in range(SYMBOLS)])
    slots, ts, price, qty, side = _ticks(200_000)
    # warm every symbol up so the benchmark measures the steady state
    engine.update(slots[:100_000], ts[:100_000], price[:100_000], qty[:100_000], side[:100_000])
    state = {"i": 100_000, "offset": 0}

    def step() -> None:
        i = state["i"]
        j = i + batch
        if j > len(ts):  # wrap around, shifting time forward so no tick is ever late
            i, j = 100_000, 100_000 + batch
            state["offset"] += int(ts[-1])
        engine.update(slots[i:j], ts[i:j] + state["offset"], price[i:j], qty[i:j], side[i:j])
        state["i"] = j

    benchmark(step)
