"""Training rows from archived ticks: the stream's own kernels, forward-return direction labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from features.engine import compute_features
from features.labels import horizon_end_ns, realized_direction
from features.spec import FeatureSpec
from tickserve.errors import DataError
from tickserve.progress import progress_bar

TICK_FIELDS = ("symbol", "event_ns", "price", "quantity", "is_buy")


@dataclass(frozen=True, slots=True)
class Dataset:
    """Feature rows with labels, in tick order, plus what evaluation and splits need.

    A row's label window is (event_ns, label_end_ns): its label is computed from the
    ticks inside it and from nothing else.
    """

    X: np.ndarray  # (n, n_features) float64
    y: np.ndarray  # (n,) int64: 1 = the price at the horizon is above this tick's price
    event_ns: np.ndarray  # (n,) int64
    symbols: np.ndarray  # (n,) object
    label_end_ns: np.ndarray  # (n,) int64: end of the label window (exclusive)
    fwd_return: np.ndarray  # (n,) float64: simple return from the tick to the horizon
    tick_index: np.ndarray  # (n,) int64: position of the row's tick in the input table
    horizon_bars: int = 1

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True, slots=True)
class Labels:
    """Forward labels of every tick (NaN where there is no direction to learn)."""

    label: np.ndarray  # float64: 1.0 up, 0.0 down, NaN
    end_ns: np.ndarray  # int64: end of each label window
    fwd_return: np.ndarray  # float64


def forward_labels(
    ticks: pd.DataFrame, bar_ns: int, horizon_bars: int = 1, progress: bool = False
) -> Labels:
    """Direction of the price `horizon_bars` bars after each tick's own bar.

    The horizon ends at the close of bar `b + horizon_bars` (b = the tick's bar); the
    price there is the last trade before that instant. Only ticks strictly after the
    tick's event time count: where none traded in the window, or the price did not
    move, the label is NaN (no direction to learn).

    >>> t = pd.DataFrame({"symbol": ["A"] * 3, "event_ns": [0, 5, 12], "price": [1.0, 2.0, 1.5]})
    >>> forward_labels(t, 10).label.tolist()
    [1.0, 0.0, nan]
    >>> forward_labels(t, 10).end_ns.tolist()
    [20, 20, 30]
    """
    if horizon_bars < 1:
        raise DataError(f"label horizon must be at least 1 bar, got {horizon_bars}")
    n = len(ticks)
    ns = ticks["event_ns"].to_numpy(np.int64)
    price = ticks["price"].to_numpy(np.float64)
    end = horizon_end_ns(ns, bar_ns, horizon_bars)
    fwd = np.full(n, np.nan)
    label = np.full(n, np.nan)
    codes, _ = pd.factorize(ticks["symbol"])
    n_symbols = codes.max() + 1 if n else 0
    with progress_bar("labels", total=n_symbols, unit=" symbols", enabled=progress) as bar:
        for code in range(n_symbols):
            rows = np.flatnonzero(codes == code)
            rows = rows[np.argsort(ns[rows], kind="stable")]
            label[rows], fwd[rows] = realized_direction(ns[rows], price[rows], end[rows])
            bar.update(1)
    fwd_return = fwd / price - 1.0
    return Labels(label, end, fwd_return)


def build_dataset(
    ticks: pd.DataFrame,
    spec: FeatureSpec,
    min_rows: int = 200,
    horizon_bars: int = 1,
    progress: bool = False,
) -> Dataset:
    """Features (same kernels as the stream) and labels for every ready, labelled tick.

    Args:
        ticks: Columns symbol, event_ns, price, quantity, is_buy; stream order per symbol.
        spec: The FeatureSpec the model will be served with.
        min_rows: Fewer usable rows than this is an error, not a model.
        horizon_bars: Label horizon in bars after the tick's own bar.
        progress: Show progress bars on stderr (features in ticks, labels in symbols).

    Raises:
        DataError: A missing column, too few bars or rows, or labels of a single class.
    """
    missing = set(TICK_FIELDS) - set(ticks.columns)
    if missing:
        raise DataError(f"tick table is missing columns {sorted(missing)}")
    ns = ticks["event_ns"].to_numpy(np.int64)
    need = spec.history + horizon_bars + 1
    bars = pd.Series(ns // spec.bar_ns).groupby(ticks["symbol"].to_numpy()).nunique()
    most = int(bars.max()) if len(bars) else 0
    if most < need:
        raise DataError(
            f"need at least {need} bars of {spec.bar_ns / 1e9:g} s for one symbol "
            f"({spec.history} of feature history + {horizon_bars} of label horizon + 1), "
            f"got {most} from {len(ticks)} ticks"
        )
    feats = compute_features(
        spec,
        ticks["symbol"].tolist(),
        ns,
        ticks["price"].to_numpy(np.float64),
        ticks["quantity"].to_numpy(np.float64),
        ticks["is_buy"].to_numpy().astype(bool),
        progress=progress,
    )
    labels = forward_labels(ticks, spec.bar_ns, horizon_bars, progress)
    keep = feats.ready & ~np.isnan(labels.label)
    n = int(keep.sum())
    if n < min_rows:
        raise DataError(
            f"need at least {min_rows} ready, labelled rows, got {n} from {len(ticks)} ticks "
            f"(features need {spec.history} bars of {spec.bar_ns / 1e9:g} s per symbol)"
        )
    y = labels.label[keep].astype(np.int64)
    if len(np.unique(y)) < 2:
        raise DataError(f"all {n} labels are the same class ({y[0]}): nothing to learn")
    return Dataset(
        feats.values[keep],
        y,
        ns[keep],
        ticks["symbol"].to_numpy(object)[keep],
        labels.end_ns[keep],
        labels.fwd_return[keep],
        np.flatnonzero(keep),
        horizon_bars,
    )
