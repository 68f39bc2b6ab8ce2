"""Training rows from archived ticks: the stream's own kernels, next-bar direction labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from features.engine import compute_features
from features.spec import FeatureSpec
from tickserve.errors import DataError


@dataclass(frozen=True, slots=True)
class Dataset:
    """Feature rows with labels, in time order per symbol, plus their event times."""

    X: np.ndarray  # (n, n_features) float64
    y: np.ndarray  # (n,) int64: 1 = the next bar closed above this tick's price
    event_ns: np.ndarray  # (n,) int64
    symbols: np.ndarray  # (n,) object


def next_bar_labels(ticks: pd.DataFrame, bar_ns: int) -> np.ndarray:
    """Direction of the next bar's close relative to each tick's price.

    Uses only ticks after the row's own bar: 1.0 up, 0.0 down, NaN where the next bar
    has no trade or closes exactly at the tick's price (no direction to learn).

    >>> t = pd.DataFrame({"symbol": ["A"] * 3, "event_ns": [0, 5, 12], "price": [1.0, 2.0, 1.5]})
    >>> next_bar_labels(t, 10).tolist()
    [1.0, 0.0, nan]
    """
    bar = ticks["event_ns"].to_numpy() // bar_ns
    keys = pd.DataFrame({"symbol": ticks["symbol"].to_numpy(), "bar": bar})
    close = (
        pd.DataFrame({"symbol": keys["symbol"], "bar": bar, "close": ticks["price"].to_numpy()})
        .groupby(["symbol", "bar"], sort=False)["close"]
        .last()
    )
    nxt = close.reindex(pd.MultiIndex.from_arrays([keys["symbol"], keys["bar"] + 1])).to_numpy()
    price = ticks["price"].to_numpy()
    labels = np.where(nxt > price, 1.0, 0.0)
    labels[np.isnan(nxt) | (nxt == price)] = np.nan
    return labels


def build_dataset(ticks: pd.DataFrame, spec: FeatureSpec, min_rows: int = 200) -> Dataset:
    """Features (same kernels as the stream) and labels for every ready, labelled tick.

    Args:
        ticks: Columns symbol, event_ns, price, quantity, is_buy; stream order per symbol.
        spec: The FeatureSpec the model will be served with.
        min_rows: Fewer usable rows than this is an error, not a model.
    """
    missing = {"symbol", "event_ns", "price", "quantity", "is_buy"} - set(ticks.columns)
    if missing:
        raise DataError(f"tick table is missing columns {sorted(missing)}")
    feats = compute_features(
        spec,
        ticks["symbol"].tolist(),
        ticks["event_ns"].to_numpy(np.int64),
        ticks["price"].to_numpy(np.float64),
        ticks["quantity"].to_numpy(np.float64),
        ticks["is_buy"].to_numpy().astype(bool),
    )
    labels = next_bar_labels(ticks, spec.bar_ns)
    keep = feats.ready & ~np.isnan(labels)
    n = int(keep.sum())
    if n < min_rows:
        raise DataError(
            f"need at least {min_rows} ready, labelled rows, got {n} from {len(ticks)} ticks "
            f"(features need {spec.history} bars of {spec.bar_ns / 1e9:g} s per symbol)"
        )
    y = labels[keep].astype(np.int64)
    if len(np.unique(y)) < 2:
        raise DataError("all labels are the same class: nothing to learn")
    return Dataset(
        feats.values[keep],
        y,
        ticks["event_ns"].to_numpy(np.int64)[keep],
        ticks["symbol"].to_numpy(object)[keep],
    )
