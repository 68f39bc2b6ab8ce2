"""Offline features as a table: one row per tick, the feature columns and `ready`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import pandas as pd

from features.engine import FeatureEngine, compute_features
from features.spec import FeatureSpec
from tickserve.errors import DataError

TICK_COLUMNS = ("symbol", "event_ns", "price", "quantity", "is_buy")


def features_frame(ticks: pd.DataFrame, spec: FeatureSpec, progress: bool = False) -> pd.DataFrame:
    """The stream's features for every tick of `ticks`, in the given (stream) order.

    Args:
        ticks: Columns symbol, event_ns, price, quantity, is_buy (plus any others,
            which are carried through, e.g. trade_id).
        spec: The FeatureSpec to compute.
        progress: Show a progress bar in ticks on stderr.

    Returns:
        `ticks` with one column per feature, `ready` and `late` added.
    """
    missing = set(TICK_COLUMNS) - set(ticks.columns)
    if missing:
        raise DataError(f"tick table is missing columns {sorted(missing)}")
    feats = compute_features(
        spec,
        ticks["symbol"].tolist(),
        ticks["event_ns"].to_numpy(np.int64),
        ticks["price"].to_numpy(np.float64),
        ticks["quantity"].to_numpy(np.float64),
        ticks["is_buy"].to_numpy().astype(bool),
        progress=progress,
    )
    out = ticks.reset_index(drop=True).copy()
    for j, name in enumerate(spec.names):
        out[name] = feats.values[:, j]
    out["ready"] = feats.ready
    out["late"] = feats.status != 0
    return out


def feature_chunks(chunks: Iterable[pd.DataFrame], spec: FeatureSpec) -> Iterator[pd.DataFrame]:
    """`features_frame` over a history that arrives in chunks, state carried between them.

    The rows equal those of `features_frame` over the whole history at once (tested),
    with memory bounded by one chunk.
    """
    engine = FeatureEngine(spec)
    for ticks in chunks:
        missing = set(TICK_COLUMNS) - set(ticks.columns)
        if missing:
            raise DataError(f"tick table is missing columns {sorted(missing)}")
        feats = engine.update(
            engine.slots(ticks["symbol"].tolist()),
            np.ascontiguousarray(ticks["event_ns"].to_numpy(np.int64)),
            np.ascontiguousarray(ticks["price"].to_numpy(np.float64)),
            np.ascontiguousarray(ticks["quantity"].to_numpy(np.float64)),
            np.ascontiguousarray(ticks["is_buy"].to_numpy().astype(bool)),
        )
        out = ticks.reset_index(drop=True).copy()
        for j, name in enumerate(spec.names):
            out[name] = feats.values[:, j]
        out["ready"] = feats.ready
        out["late"] = feats.status != 0
        yield out
