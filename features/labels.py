"""The label definition on the stream's bars: where a tick's horizon ends, which way the price went.

Training (`training.dataset.forward_labels`) and the live quality monitor
(`stream.monitor`) both call these two functions, so a model is judged live on
exactly what it was trained to predict.
"""

from __future__ import annotations

import numpy as np


def horizon_end_ns(event_ns: np.ndarray, bar_ns: int, horizon_bars: int) -> np.ndarray:
    """End (exclusive) of each tick's label window: the close of bar `b + horizon_bars`.

    >>> horizon_end_ns(np.array([0, 5, 12]), 10, 1).tolist()
    [20, 20, 30]
    """
    return (np.asarray(event_ns, np.int64) // bar_ns + horizon_bars + 1) * bar_ns


def realized_direction(
    times: np.ndarray, prices: np.ndarray, end_ns: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Direction of one symbol's price from each tick to its horizon end.

    The price at the horizon is the last trade before `end_ns`; only ticks strictly
    after the tick's own event time count. Where none traded in the window, or the
    price did not move, the label is NaN (no direction to learn).

    Args:
        times: Event times of one symbol's ticks, sorted ascending.
        prices: Their prices.
        end_ns: Each tick's horizon end (`horizon_end_ns`).

    Returns:
        (label, forward price): 1.0 up, 0.0 down, NaN; the forward price or NaN.

    >>> label, fwd = realized_direction(np.array([0, 5, 12]), np.array([1.0, 2.0, 1.5]),
    ...                                 np.array([20, 20, 30]))
    >>> label.tolist(), fwd.tolist()
    ([1.0, 0.0, nan], [1.5, 1.5, nan])
    """
    fwd = np.full(len(times), np.nan)
    last = np.searchsorted(times, end_ns, side="left") - 1
    later = times[last] > times  # strictly after the row's own event time
    fwd[later] = prices[last[later]]
    label = np.where(fwd > prices, 1.0, 0.0)
    label[np.isnan(fwd) | (fwd == prices)] = np.nan
    return label, fwd
