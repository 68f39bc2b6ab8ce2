"""Dataset, labels and splits: no look-ahead, no label window reaching into a test fold."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.engine import compute_features
from features.spec import NS_PER_SECOND, FeatureSpec
from tests.helpers import TRADES
from tickserve.errors import ConfigError, DataError
from training.dataset import build_dataset, forward_labels
from training.splits import purged_folds

SPEC = FeatureSpec()


@pytest.fixture(scope="module")
def ticks() -> pd.DataFrame:
    raw = pd.read_parquet(TRADES)
    return pd.DataFrame(
        {
            "symbol": "XRP/ETH",
            "event_ns": raw["timestamp"].to_numpy(np.int64) * 1_000_000,
            "price": raw["price"].to_numpy(np.float64),
            "quantity": raw["amount"].to_numpy(np.float64),
            "is_buy": (raw["side"] == "buy").to_numpy(),
        }
    )


def _features(frame: pd.DataFrame) -> np.ndarray:
    return compute_features(
        SPEC, frame["symbol"].tolist(), frame["event_ns"].to_numpy(), frame["price"].to_numpy(),
        frame["quantity"].to_numpy(), frame["is_buy"].to_numpy(),
    ).values  # fmt: skip


def _perturb_after(frame: pd.DataFrame, after_ns: int, seed: int) -> pd.DataFrame:
    """Every tick strictly after `after_ns` gets another price, size and side."""
    rng = np.random.default_rng(seed)
    out = frame.copy()
    later = out["event_ns"].to_numpy() > after_ns
    k = int(later.sum())
    out.loc[later, "price"] *= np.exp(rng.normal(0, 0.01, k))
    out.loc[later, "quantity"] *= rng.uniform(0.1, 10, k)
    out.loc[later, "is_buy"] = ~out.loc[later, "is_buy"]
    return out


def test_changing_any_later_tick_changes_no_earlier_feature(ticks: pd.DataFrame) -> None:
    base = _features(ticks)
    base_ds = build_dataset(ticks, SPEC)
    rng = np.random.default_rng(3)
    for cut in rng.integers(1000, len(ticks) - 10, 12):
        t = int(ticks["event_ns"].iloc[cut])
        changed = _perturb_after(ticks, t, int(cut))
        feats = _features(changed)
        seen = ticks["event_ns"].to_numpy() <= t
        np.testing.assert_array_equal(feats[seen], base[seen])
        assert not np.array_equal(feats[~seen], base[~seen], equal_nan=True)  # the control
        ds = build_dataset(changed, SPEC)
        # rows whose label became NaN drop out; every row kept in both is unchanged
        both, a, b = np.intersect1d(ds.tick_index, base_ds.tick_index, return_indices=True)
        early = ds.event_ns[a] <= t
        assert early.sum() > 500
        np.testing.assert_array_equal(ds.X[a][early], base_ds.X[b][early])


def test_labels_look_only_inside_their_window(ticks: pd.DataFrame) -> None:
    labels = forward_labels(ticks, SPEC.bar_ns, horizon_bars=3)
    ns = ticks["event_ns"].to_numpy()
    assert (labels.end_ns > ns).all()
    assert (labels.end_ns - ns <= 4 * SPEC.bar_ns).all()
    rng = np.random.default_rng(5)
    for row in rng.integers(0, len(ticks) - 500, 20):
        end = int(labels.end_ns[row])
        changed = _perturb_after(ticks, end - 1, int(row))  # ticks at or after the window end
        again = forward_labels(changed, SPEC.bar_ns, horizon_bars=3)
        np.testing.assert_array_equal(again.label[row], labels.label[row])
    # and the label does depend on the window (the control)
    row = int(np.flatnonzero(~np.isnan(labels.label))[100])
    inside = ticks.copy()
    window = (ns > ns[row]) & (ns < labels.end_ns[row])
    inside.loc[window, "price"] = ticks["price"].iloc[row] * (2 - labels.label[row])
    assert forward_labels(inside, SPEC.bar_ns, 3).label[row] != labels.label[row]


def _overlaps(event_ns: np.ndarray, end_ns: np.ndarray, a: np.ndarray, b: np.ndarray) -> int:
    """Pairs (i in a, j in b) whose label windows [event, end) intersect."""
    order = np.argsort(event_ns[b])
    starts, ends = event_ns[b][order], end_ns[b]
    count = 0
    for i in a:
        # windows in b starting before i's window ends, minus those that end before it starts
        candidates = order[: np.searchsorted(starts, end_ns[i], side="left")]
        count += int((ends[candidates] > event_ns[i]).sum())
    return count


@pytest.mark.parametrize("walk_forward", [True, False])
@pytest.mark.parametrize("horizon", [1, 5])
def test_no_training_label_window_overlaps_a_test_row(
    ticks: pd.DataFrame, walk_forward: bool, horizon: int
) -> None:
    ds = build_dataset(ticks, SPEC, horizon_bars=horizon)
    horizon_ns = (horizon + 1) * SPEC.bar_ns
    folds = purged_folds(ds.event_ns, ds.label_end_ns, 4, purge_ns=SPEC.bar_ns,
                         embargo_ns=horizon_ns, walk_forward=walk_forward,
                         min_label_ns=horizon_ns)  # fmt: skip
    assert len(folds) == 4
    for fold in folds:
        assert len(fold.train) > 0 and len(fold.test) > 0
        assert not set(fold.train) & set(fold.test)
        assert _overlaps(ds.event_ns, ds.label_end_ns, fold.train, fold.test) == 0
        test_start = ds.event_ns[fold.test].min()
        before = fold.train[ds.event_ns[fold.train] < test_start]
        assert (ds.label_end_ns[before] + SPEC.bar_ns <= test_start).all()
        after = fold.train[ds.event_ns[fold.train] >= test_start]
        if walk_forward:
            assert len(after) == 0
        elif len(after):
            assert ds.event_ns[after].min() >= ds.label_end_ns[fold.test].max() + horizon_ns
    # the control: a plain cut by time does overlap, so the check above can fail
    cut = folds[-1].test.min()
    order = np.argsort(ds.event_ns, kind="stable")
    naive_train, naive_test = order[order < cut], order[order >= cut]
    assert _overlaps(ds.event_ns, ds.label_end_ns, naive_train[-200:], naive_test[:200]) > 0


def test_embargo_shorter_than_the_horizon_is_refused(ticks: pd.DataFrame) -> None:
    ds = build_dataset(ticks, SPEC, horizon_bars=2)
    with pytest.raises(ConfigError, match="shorter than the label horizon"):
        purged_folds(ds.event_ns, ds.label_end_ns, 3, embargo_ns=SPEC.bar_ns,
                     min_label_ns=3 * SPEC.bar_ns)  # fmt: skip


def test_bad_inputs_get_clear_errors(ticks: pd.DataFrame) -> None:
    with pytest.raises(DataError, match=r"missing columns \['quantity'\]"):
        build_dataset(ticks.drop(columns="quantity"), SPEC)
    short = ticks[ticks["event_ns"] < ticks["event_ns"].iloc[0] + 20 * 60 * NS_PER_SECOND]
    with pytest.raises(DataError, match=r"need at least 27 bars of 60 s .*got 14 from 58 ticks"):
        build_dataset(short, SPEC)
    with pytest.raises(DataError, match="need at least 27 bars of 60 s .*got 0 from 0 ticks"):
        build_dataset(ticks.head(0), SPEC)
    rising = ticks.assign(price=np.linspace(1.0, 2.0, len(ticks)))
    with pytest.raises(DataError, match="same class"):
        build_dataset(rising, SPEC)


def test_building_a_dataset_shows_progress_only_when_asked(
    ticks: pd.DataFrame, capfd: pytest.CaptureFixture[str]
) -> None:
    two = pd.concat([ticks, ticks.assign(symbol="XRP/ETH copy")], ignore_index=True)
    n = len(two)
    quiet = build_dataset(two, SPEC)
    assert capfd.readouterr().err == ""
    shown = build_dataset(two, SPEC, progress=True)
    err = capfd.readouterr().err
    assert "features: 100%" in err and f"{n}/{n} [" in err
    assert "labels: 100%" in err and "2/2 [" in err
    np.testing.assert_array_equal(shown.X, quiet.X)
    np.testing.assert_array_equal(shown.y, quiet.y)
