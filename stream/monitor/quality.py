"""The monitor's arithmetic, free of faust: pending calls, realized hits, histogram bins, PSI."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from features.labels import horizon_end_ns, realized_direction
from stream.contracts.signal import DOWN, FLAT, UP

# a bin the live (or reference) data never hit counts as this share, so PSI stays finite
PSI_FLOOR = 1e-4


@dataclass(frozen=True, slots=True)
class Resolved:
    """Calls whose horizon has passed, with the realized direction (the training label).

    Attributes:
        event_ns: Event time of each called tick.
        version: Code of the model version that made the call (`PendingTicks.add`).
        hit: Whether the call agreed with the realized direction.
    """

    event_ns: np.ndarray
    version: np.ndarray
    hit: np.ndarray

    def __len__(self) -> int:
        return len(self.event_ns)


@dataclass(slots=True)
class PendingTicks:
    """One symbol's recent ticks, kept until every call among them can be judged.

    A call is judged once a tick at or after its horizon end has arrived: the price
    at the horizon (the last trade before the end) cannot change any more. Ticks
    older than the oldest open call are dropped; judged calls stay as prices only.
    """

    bar_ns: int
    horizon_bars: int
    times: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    prices: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))
    direction: np.ndarray = field(default_factory=lambda: np.empty(0, np.int8))
    version: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))

    def __len__(self) -> int:
        return len(self.times)

    def add(
        self, times: np.ndarray, prices: np.ndarray, direction: np.ndarray, version: int
    ) -> Resolved:
        """Append ticks (in event order) called by `version`; return the calls now judged.

        >>> p = PendingTicks(bar_ns=10, horizon_bars=1)
        >>> r = p.add(np.array([0, 5]), np.array([1.0, 2.0]), np.array([UP, UP], np.int8), 0)
        >>> len(r)
        0
        >>> r = p.add(np.array([21]), np.array([3.0]), np.array([FLAT], np.int8), 0)
        >>> r.hit.tolist()  # 1.0 -> 2.0 went up, 2.0 -> 2.0 did not move (no label)
        [True]
        """
        t = np.concatenate([self.times, times])
        order = np.argsort(t, kind="stable")
        t = t[order]
        p = np.concatenate([self.prices, prices])[order]
        d = np.concatenate([self.direction, direction])[order]
        v = np.concatenate([self.version, np.full(len(times), version, np.int32)])[order]
        called = d != FLAT
        end = horizon_end_ns(t, self.bar_ns, self.horizon_bars)
        judged = called & (end <= t[-1]) if len(t) else called
        label, _ = realized_direction(t, p, end)
        rows = np.flatnonzero(judged & ~np.isnan(label))
        hit = (label[rows] == 1.0) == (d[rows] == UP)
        resolved = Resolved(t[rows], v[rows], hit)
        d[judged] = FLAT
        open_calls = np.flatnonzero(d != FLAT)
        # an open call needs every tick after it; without one, only the newest tick
        keep = open_calls[0] if open_calls.size else max(len(t) - 1, 0)
        self.times, self.prices, self.direction, self.version = (
            t[keep:],
            p[keep:],
            d[keep:],
            v[keep:],
        )
        return resolved


def hits_by_bucket(resolved: Resolved, step_ns: int) -> dict[tuple[int, int], tuple[int, int]]:
    """(version code, bucket start ns) -> (hits, calls): one window update per bucket.

    >>> r = Resolved(np.array([1, 2, 12]), np.array([0, 0, 0]), np.array([True, False, True]))
    >>> hits_by_bucket(r, 10)
    {(0, 0): (1, 2), (0, 10): (1, 1)}
    """
    out: dict[tuple[int, int], tuple[int, int]] = {}
    if not len(resolved):
        return out
    bucket = resolved.event_ns // step_ns * step_ns
    keys = np.stack([resolved.version.astype(np.int64), bucket], axis=1)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    hits = np.bincount(inverse, weights=resolved.hit, minlength=len(uniq))
    calls = np.bincount(inverse, minlength=len(uniq))
    for i, (code, start) in enumerate(uniq.tolist()):
        out[(int(code), int(start))] = (int(hits[i]), int(calls[i]))
    return out


def bin_counts(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Counts of `values` in the bins of `edges` (np.histogram's bins; outliers go to the ends).

    >>> bin_counts(np.array([0.0, 1.0, 2.0]), np.array([-5.0, 0.5, 1.0, 2.0, 9.0, np.nan])).tolist()
    [2, 3]
    """
    finite = values[np.isfinite(values)]
    index = np.searchsorted(edges[1:-1], finite, side="right")
    return np.bincount(index, minlength=len(edges) - 1)


def psi(reference: np.ndarray, live: np.ndarray) -> float:
    """Population stability index of `live` counts against `reference` counts (same bins).

    Sum over bins of (live share - reference share) * ln(live share / reference share);
    NaN while `live` is empty.

    >>> round(psi(np.array([50, 50]), np.array([50, 50])), 6)
    0.0
    >>> round(psi(np.array([50, 50]), np.array([90, 10])), 3)
    0.879
    """
    total = live.sum()
    if total == 0:
        return float("nan")
    expected = np.maximum(reference / reference.sum(), PSI_FLOOR)
    actual = np.maximum(live / total, PSI_FLOOR)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


__all__ = ["DOWN", "UP", "PendingTicks", "Resolved", "bin_counts", "hits_by_bucket", "psi"]
