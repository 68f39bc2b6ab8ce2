"""Feature kernels: streaming equals batch, TA-Lib parity on completed bars, warm-up, late ticks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import talib

from features.engine import FeatureEngine, compute_features
from features.kernels import STATUS_LATE, STATUS_OK
from features.spec import NS_PER_SECOND, FeatureSpec
from tests.conftest import TRADES
from tickserve.errors import ConfigError

SPEC = FeatureSpec()


@pytest.fixture(scope="module")
def trades() -> pd.DataFrame:
    df = pd.read_parquet(TRADES)
    return pd.DataFrame(
        {
            "symbol": "XRP/ETH",
            "event_ns": df["timestamp"].to_numpy(np.int64) * 1_000_000,
            "price": df["price"].to_numpy(np.float64),
            "quantity": df["amount"].to_numpy(np.float64),
            "is_buy": (df["side"] == "buy").to_numpy(),
        }
    )


def _stream(trades: pd.DataFrame, sizes: list[int], spec: FeatureSpec = SPEC) -> np.ndarray:
    engine = FeatureEngine(spec, initial_symbols=1)
    out = []
    i, k = 0, 0
    while i < len(trades):
        part = trades.iloc[i : i + sizes[k % len(sizes)]]
        slots = engine.slots(part["symbol"].tolist())
        out.append(
            engine.update(
                slots,
                part["event_ns"].to_numpy(),
                part["price"].to_numpy(),
                part["quantity"].to_numpy(),
                part["is_buy"].to_numpy(),
            ).values
        )
        i += len(part)
        k += 1
    return np.concatenate(out)


@pytest.mark.parametrize("sizes", [[1], [7, 1, 250], [1000]])
def test_streaming_equals_batch_bit_for_bit(trades: pd.DataFrame, sizes: list[int]) -> None:
    batch = compute_features(
        SPEC,
        trades["symbol"].tolist(),
        trades["event_ns"].to_numpy(),
        trades["price"].to_numpy(),
        trades["quantity"].to_numpy(),
        trades["is_buy"].to_numpy(),
    ).values
    streamed = _stream(trades.iloc[:3000] if sizes == [1] else trades, sizes)
    np.testing.assert_array_equal(streamed, batch[: len(streamed)])


def _bar_closes(trades: pd.DataFrame, bar_ns: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bar closes with empty bars carried forward, and the index of each bar's last tick."""
    bars = trades["event_ns"].to_numpy() // bar_ns
    last_tick = pd.Series(np.arange(len(bars))).groupby(bars).last()
    full = np.arange(bars[0], bars[-1] + 1)
    closes = (
        pd.Series(trades["price"].to_numpy()[last_tick.to_numpy()], index=last_tick.index)
        .reindex(full)
        .ffill()
        .to_numpy()
    )
    has_tick = np.isin(full, last_tick.index)
    return closes, has_tick, last_tick.to_numpy()


def test_completed_bars_match_talib(trades: pd.DataFrame) -> None:
    feats = compute_features(
        SPEC,
        trades["symbol"].tolist(),
        trades["event_ns"].to_numpy(),
        trades["price"].to_numpy(),
        trades["quantity"].to_numpy(),
        trades["is_buy"].to_numpy(),
    )
    closes, has_tick, last_tick = _bar_closes(trades, SPEC.bar_ns)
    rsi = talib.RSI(closes, timeperiod=14)[has_tick]
    upper, middle, lower = talib.BBANDS(closes, timeperiod=20, nbdevup=2, nbdevdn=2, matype=0)
    bb_pos = ((closes - lower) / (upper - lower))[has_tick]
    ret = np.full_like(closes, np.nan)
    ret[24:] = np.log(closes[24:] / closes[:-24])
    ret = ret[has_tick]
    ours = feats.values[last_tick]
    warm = ~np.isnan(rsi) & ~np.isnan(bb_pos) & ~np.isnan(ret) & ((upper - lower)[has_tick] > 0)
    assert warm.sum() > 1000
    np.testing.assert_allclose(ours[warm, 1], rsi[warm], rtol=1e-9)
    # TA-Lib's running-sum variance loses a few digits that our two-pass one keeps;
    # positions near 0 then differ ~1e-12 absolute, so an absolute floor as well
    np.testing.assert_allclose(ours[warm, 2], bb_pos[warm], rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(ours[warm, 0], ret[warm], rtol=1e-9, atol=1e-15)


def test_warm_up_is_explicit() -> None:
    spec = FeatureSpec(bar_ns=NS_PER_SECOND)
    n = 30
    feats = compute_features(
        spec,
        ["A"] * n,
        np.arange(n, dtype=np.int64) * NS_PER_SECOND,
        1.0 + 0.01 * np.sin(np.arange(n)),
        np.ones(n),
        np.arange(n) % 2 == 0,
    )
    # 24 completed bars are needed for return_24h and vol_ratio_24: the 25th tick is the first
    assert not feats.ready[:24].any()
    assert feats.ready[24:].all()
    assert np.isnan(feats.values[:13, 1]).all()  # RSI needs 14 changes
    assert not np.isnan(feats.values[24:]).any()


def test_late_tick_is_flagged_and_leaves_state_alone() -> None:
    spec = FeatureSpec(bar_ns=NS_PER_SECOND, late_tolerance_ns=100_000_000)
    engine = FeatureEngine(spec)
    slots = engine.slots(["A", "A", "A", "A"])
    ts = np.array([0, 1_500_000_000, 950_000_000, 100_000_000], np.int64)
    feats = engine.update(slots, ts, np.array([1.0, 2.0, 3.0, 4.0]), np.ones(4), np.ones(4, bool))
    # 0.95 s is within 0.1 s of the open bar [1 s, 2 s): it counts; 0.1 s is late
    assert feats.status.tolist() == [STATUS_OK, STATUS_OK, STATUS_OK, STATUS_LATE]
    assert np.isnan(feats.values[3]).all()
    assert engine.fstate[0, 3] == 3.0  # the open bar's close is the in-tolerance tick


def test_symbols_grow_up_to_the_maximum() -> None:
    engine = FeatureEngine(SPEC, max_symbols=5, initial_symbols=2)
    assert engine.slots(["a", "b", "c", "a", "d", "e"]).tolist() == [0, 1, 2, 0, 3, 4]
    with pytest.raises(ConfigError, match="max_symbols=5"):
        engine.slots(["f"])


def test_symbols_do_not_share_state(trades: pd.DataFrame) -> None:
    part = trades.iloc[:4000]
    alone = compute_features(
        SPEC, part["symbol"].tolist(), part["event_ns"].to_numpy(), part["price"].to_numpy(),
        part["quantity"].to_numpy(), part["is_buy"].to_numpy(),
    ).values  # fmt: skip
    # interleave a second symbol with other prices: the first symbol's rows must not move
    mixed = pd.concat([part, part.assign(symbol="B", price=part["price"] * 7)]).sort_values(
        "event_ns", kind="stable"
    )
    feats = compute_features(
        SPEC, mixed["symbol"].tolist(), mixed["event_ns"].to_numpy(), mixed["price"].to_numpy(),
        mixed["quantity"].to_numpy(), mixed["is_buy"].to_numpy(),
    ).values  # fmt: skip
    np.testing.assert_array_equal(feats[(mixed["symbol"] == "XRP/ETH").to_numpy()], alone)
