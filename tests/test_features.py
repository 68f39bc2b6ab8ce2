"""Feature kernels: streaming equals batch, TA-Lib parity on completed bars, warm-up, late ticks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import talib

from features import kernels
from features.engine import FULL, FeatureEngine, compute_features
from features.kernels import STATUS_LATE, STATUS_OK
from features.spec import NS_PER_SECOND, FeatureSpec
from tests.helpers import TRADES

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


def test_offline_chunks_equal_one_call_and_show_progress_only_when_asked(
    trades: pd.DataFrame, capfd: pytest.CaptureFixture[str]
) -> None:
    columns = (trades["symbol"].tolist(), trades["event_ns"].to_numpy(), trades["price"].to_numpy(),
               trades["quantity"].to_numpy(), trades["is_buy"].to_numpy())  # fmt: skip
    n = len(trades)
    whole = compute_features(SPEC, *columns, chunk_ticks=n)
    assert capfd.readouterr().err == ""
    chunked = compute_features(SPEC, *columns, progress=True, chunk_ticks=1000)
    err = capfd.readouterr().err
    assert "features: 100%" in err and f"{n}/{n}" in err
    np.testing.assert_array_equal(chunked.values, whole.values)
    np.testing.assert_array_equal(chunked.ready, whole.ready)
    np.testing.assert_array_equal(chunked.status, whole.status)


COL = {name: i for i, name in enumerate(SPEC.names)}


def _bars(trades: pd.DataFrame, bar_ns: int) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Completed bars (empty ones: last close, zero volume), which bars had ticks, last ticks."""
    bars = trades["event_ns"].to_numpy() // bar_ns
    grouped = trades.assign(bar=bars, pv=trades["price"] * trades["quantity"],
                            buy=trades["quantity"] * trades["is_buy"]).groupby("bar")  # fmt: skip
    last_tick = pd.Series(np.arange(len(bars))).groupby(bars).last()
    full = np.arange(bars[0], bars[-1] + 1)
    frame = pd.DataFrame(
        {
            "close": grouped["price"].last(),
            "volume": grouped["quantity"].sum(),
            "buy": grouped["buy"].sum(),
            "pv": grouped["pv"].sum(),
        }
    ).reindex(full)
    frame["close"] = frame["close"].ffill()
    frame = frame.fillna(0.0).reset_index(drop=True)
    return frame, np.isin(full, last_tick.index), last_tick.to_numpy()


@pytest.fixture(scope="module")
def reference(trades: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """Our features on each bar's last tick, and textbook values for the same completed bars."""
    feats = compute_features(
        SPEC,
        trades["symbol"].tolist(),
        trades["event_ns"].to_numpy(),
        trades["price"].to_numpy(),
        trades["quantity"].to_numpy(),
        trades["is_buy"].to_numpy(),
    )
    bars, has_tick, last_tick = _bars(trades, SPEC.bar_ns)
    closes = bars["close"].to_numpy()
    upper, _, lower = talib.BBANDS(closes, timeperiod=20, nbdevup=2, nbdevdn=2, matype=0)
    ema12 = talib.EMA(closes, timeperiod=12)
    ema26 = talib.EMA(closes, timeperiod=26)
    log_close = np.log(closes)
    one_bar = pd.Series(np.diff(log_close, prepend=np.nan))
    vol = bars["volume"]
    ref = pd.DataFrame(
        {
            "return_1": one_bar,
            "return_5": pd.Series(log_close).diff(5),
            "return_24h": pd.Series(log_close).diff(24),
            "rsi_14": talib.RSI(closes, timeperiod=14),
            "bb_pos_20": (closes - lower) / (upper - lower),
            "ema_12_dev": closes / ema12 - 1,
            "macd_12_26": (ema12 - ema26) / closes,
            "realized_vol_24": one_bar.rolling(24).std(ddof=0),
            "vol_ratio_24": vol / vol.shift(1).rolling(24).mean(),
            "vwap_dev_24": closes / (bars["pv"].rolling(25).sum() / vol.rolling(25).sum()) - 1,
            "flow_imbalance_24": (2 * bars["buy"].rolling(25).sum() - vol.rolling(25).sum())
            / vol.rolling(25).sum(),
        }
    )
    return feats.values[last_tick], ref[has_tick].reset_index(drop=True)


@pytest.mark.parametrize(
    ("name", "atol"),
    [
        ("return_1", 1e-15), ("return_5", 1e-15), ("return_24h", 1e-15), ("rsi_14", 0),
        # TA-Lib's running-sum variance loses a few digits that our two-pass one keeps;
        # positions near 0 then differ ~1e-12 absolute, so an absolute floor as well
        ("bb_pos_20", 1e-11), ("ema_12_dev", 1e-15), ("macd_12_26", 1e-15),
        ("realized_vol_24", 1e-15), ("vol_ratio_24", 0), ("vwap_dev_24", 1e-15),
        ("flow_imbalance_24", 1e-15),
    ],
)  # fmt: skip
def test_completed_bars_match_the_reference(
    reference: tuple[np.ndarray, pd.DataFrame], name: str, atol: float
) -> None:
    ours, ref = reference
    ours_col = ours[:, COL[name]]
    expected = ref[name].to_numpy()
    warm = ~np.isnan(ours).any(axis=1) & ~ref.isna().any(axis=1).to_numpy()
    assert warm.sum() > 1000
    np.testing.assert_allclose(ours_col[warm], expected[warm], rtol=1e-9, atol=atol)


def test_one_value_at_a_time_against_talipp(reference: tuple[np.ndarray, pd.DataFrame],
                                            trades: pd.DataFrame) -> None:  # fmt: skip
    from talipp.indicators import BB, EMA, RSI

    ours, _ = reference
    bars, has_tick, _ = _bars(trades, SPEC.bar_ns)
    rsi, bb, ema = RSI(14), BB(20, 2.0), EMA(12)
    got_rsi, got_bb, got_ema = [], [], []
    for close in bars["close"].to_numpy():
        rsi.add(close)
        bb.add(close)
        ema.add(close)
        got_rsi.append(rsi[-1] if rsi[-1] is not None else np.nan)
        band = bb[-1]
        got_bb.append(np.nan if band is None else (close - band.lb) / (band.ub - band.lb))
        got_ema.append(close / ema[-1] - 1 if ema[-1] is not None else np.nan)
    for name, values, rtol in (("rsi_14", got_rsi, 1e-11), ("bb_pos_20", got_bb, 1e-8),
                               ("ema_12_dev", got_ema, 1e-9)):  # fmt: skip
        expected = np.asarray(values)[has_tick]
        warm = ~np.isnan(expected) & ~np.isnan(ours[:, COL[name]])
        assert warm.sum() > 1000
        np.testing.assert_allclose(ours[warm, COL[name]], expected[warm], rtol=rtol, atol=1e-10)


def test_prices_like_60000_01_keep_their_precision() -> None:
    """A flat-ish series around 60000.01: running sums of squares would cancel to noise."""
    n = 400
    rng = np.random.default_rng(3)
    price = 60000.01 + np.round(rng.normal(0, 0.01, n), 2)
    spec = FeatureSpec(bar_ns=NS_PER_SECOND)
    feats = compute_features(spec, ["BTC"] * n, np.arange(n, dtype=np.int64) * NS_PER_SECOND,
                             price, np.ones(n), np.ones(n, bool))  # fmt: skip
    window = np.lib.stride_tricks.sliding_window_view(price, 20)
    mean, std = window.mean(axis=1), window.std(axis=1)  # two-pass
    exact = (price[19:] - (mean - 2 * std)) / (4 * std)
    # The inputs carry ~6e-12 absolute error each, ~6e-10 relative to a std of 0.01: the
    # best any method can do. Sums of squares would be off by ~1e-1 here.
    np.testing.assert_allclose(feats.values[19:, COL["bb_pos_20"]], exact, rtol=0, atol=1e-8)
    sum_sq = (window**2).mean(axis=1) - window.mean(axis=1) ** 2
    naive_std = np.sqrt(np.maximum(sum_sq, 0))
    assert np.max(np.abs(naive_std - std) / std) > 1e-3  # the trap this test guards


def test_late_tick_is_flagged_and_leaves_state_alone() -> None:
    spec = FeatureSpec(bar_ns=NS_PER_SECOND, late_tolerance_ns=100_000_000)
    engine = FeatureEngine(spec)
    slots = engine.slots(["A", "A", "A", "A"])
    ts = np.array([0, 1_500_000_000, 950_000_000, 100_000_000], np.int64)
    feats = engine.update(slots, ts, np.array([1.0, 2.0, 3.0, 4.0]), np.ones(4), np.ones(4, bool))
    # 0.95 s is within 0.1 s of the open bar [1 s, 2 s): it counts; 0.1 s is late
    assert feats.status.tolist() == [STATUS_OK, STATUS_OK, STATUS_OK, STATUS_LATE]
    assert np.isnan(feats.values[3]).all()
    assert engine.fstate[0, kernels.F_CLOSE] == 3.0  # the open bar's close: the in-tolerance tick


def test_symbols_grow_up_to_the_maximum() -> None:
    engine = FeatureEngine(SPEC, max_symbols=5, initial_symbols=2)
    assert engine.slots(["a", "b", "c", "a", "d", "e"]).tolist() == [0, 1, 2, 0, 3, 4]
    # full: a new symbol gets no slot (the worker dead-letters its ticks), known ones keep theirs
    assert engine.full
    assert engine.slots(["f", "a", "g", "e"]).tolist() == [FULL, 0, FULL, 4]
    assert engine.symbols == ["a", "b", "c", "d", "e"]


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


def test_a_reset_symbol_reads_its_ticks_again_as_new(trades: pd.DataFrame) -> None:
    part = trades.iloc[:2000]
    columns = [part[c].to_numpy() for c in ("event_ns", "price", "quantity", "is_buy")]
    engine = FeatureEngine(SPEC)
    first = engine.update(engine.slots(["A"] * len(part)), *columns)
    engine.update(engine.slots(["B"] * len(part)), *columns)
    b_state = engine.fstate[engine.slot_of["B"]].copy()
    again = engine.update(engine.slots(["A"] * len(part)), *columns)
    assert (again.status == STATUS_LATE).sum() > 1000  # what a rebuild without reset gave
    engine.reset(["A"])
    rebuilt = engine.update(engine.slots(["A"] * len(part)), *columns)
    np.testing.assert_array_equal(rebuilt.values, first.values)
    np.testing.assert_array_equal(rebuilt.status, first.status)
    np.testing.assert_array_equal(engine.fstate[engine.slot_of["B"]], b_state)
