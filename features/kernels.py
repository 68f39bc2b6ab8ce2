"""Numba kernels: time bars and per-tick features over a whole micro-batch, O(1) state per symbol.

State lives in preallocated arrays indexed by a symbol slot (see `features.engine`):
`fstate[slot, F_*]` (floats), `istate[slot, I_*]` (ints) and two ring buffers of
completed-bar closes and volumes. Every tick updates the open bar and emits the
features as if the open bar closed at that tick's price, so the values move on
every tick, and a completed bar's last tick carries exactly the value a batch
indicator (TA-Lib) gives for that bar.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# fstate columns
F_OPEN, F_HIGH, F_LOW, F_CLOSE, F_VOLUME, F_BUY_VOLUME = 0, 1, 2, 3, 4, 5
F_AVG_GAIN, F_AVG_LOSS = 6, 7  # Wilder averages (sums while seeding)
N_FSTATE = 8
# istate columns
I_BAR, I_NBARS, I_HEAD, I_NTRADES, I_LAST_NS = 0, 1, 2, 3, 4
N_ISTATE = 5

STATUS_OK = 0
STATUS_LATE = 1

NAN = np.nan


@njit(cache=True, inline="always")
def _recent(ring: np.ndarray, slot: int, head: int, k: int) -> float:
    """k-th most recent completed value (k=1 is the last completed bar)."""
    size = ring.shape[1]
    return ring[slot, (head - k) % size]


@njit(cache=True)
def _complete_bar(
    slot: int,
    close: float,
    volume: float,
    fstate: np.ndarray,
    istate: np.ndarray,
    closes: np.ndarray,
    volumes: np.ndarray,
    rsi_period: int,
) -> None:
    """Push one completed bar into the ring buffers and advance Wilder's RSI."""
    nbars = istate[slot, I_NBARS]
    head = istate[slot, I_HEAD]
    if nbars >= 1:
        change = close - _recent(closes, slot, head, 1)
        gain = change if change > 0.0 else 0.0
        loss = -change if change < 0.0 else 0.0
        nchanges = nbars  # changes seen after this one is added
        if nchanges <= rsi_period:
            fstate[slot, F_AVG_GAIN] += gain
            fstate[slot, F_AVG_LOSS] += loss
            if nchanges == rsi_period:
                fstate[slot, F_AVG_GAIN] /= rsi_period
                fstate[slot, F_AVG_LOSS] /= rsi_period
        else:
            fstate[slot, F_AVG_GAIN] = (
                fstate[slot, F_AVG_GAIN] * (rsi_period - 1) + gain
            ) / rsi_period
            fstate[slot, F_AVG_LOSS] = (
                fstate[slot, F_AVG_LOSS] * (rsi_period - 1) + loss
            ) / rsi_period
    size = closes.shape[1]
    closes[slot, head] = close
    volumes[slot, head] = volume
    istate[slot, I_HEAD] = (head + 1) % size
    istate[slot, I_NBARS] = nbars + 1


@njit(cache=True)
def _roll_bars(
    slot: int,
    bar: int,
    fstate: np.ndarray,
    istate: np.ndarray,
    closes: np.ndarray,
    volumes: np.ndarray,
    rsi_period: int,
) -> None:
    """Close the open bar and any empty bars up to `bar` (flat close, zero volume)."""
    close = fstate[slot, F_CLOSE]
    _complete_bar(slot, close, fstate[slot, F_VOLUME], fstate, istate, closes, volumes, rsi_period)
    gap = bar - istate[slot, I_BAR] - 1
    # Past the ring size plus the RSI seed, more flat bars change nothing but the
    # Wilder averages, which decay geometrically: apply that in closed form.
    cap = closes.shape[1] + rsi_period + 1
    for _ in range(min(gap, cap)):
        _complete_bar(slot, close, 0.0, fstate, istate, closes, volumes, rsi_period)
    if gap > cap:
        decay = ((rsi_period - 1) / rsi_period) ** (gap - cap)
        fstate[slot, F_AVG_GAIN] *= decay
        fstate[slot, F_AVG_LOSS] *= decay
        istate[slot, I_NBARS] += gap - cap


@njit(cache=True)
def update_batch(
    slots: np.ndarray,
    event_ns: np.ndarray,
    price: np.ndarray,
    quantity: np.ndarray,
    is_buy: np.ndarray,
    fstate: np.ndarray,
    istate: np.ndarray,
    closes: np.ndarray,
    volumes: np.ndarray,
    bar_ns: int,
    late_tolerance_ns: int,
    return_bars: int,
    rsi_period: int,
    bb_period: int,
    bb_k: float,
    vol_bars: int,
    out: np.ndarray,
    ready: np.ndarray,
    status: np.ndarray,
) -> None:
    """Apply a micro-batch of ticks in order and write one feature row per tick.

    Columns of `out`: return_24h, rsi_14, bb_pos_20, vol_ratio_24 (see FeatureSpec).
    A late tick (older than its symbol's open bar minus the tolerance) leaves the
    state untouched and gets status LATE with NaN features.
    """
    for i in range(slots.shape[0]):
        s = slots[i]
        ts = event_ns[i]
        p = price[i]
        q = quantity[i]
        bar = ts // bar_ns
        current = istate[s, I_BAR]
        status[i] = STATUS_OK
        if current < 0:
            istate[s, I_BAR] = bar
            fstate[s, F_OPEN] = p
            fstate[s, F_HIGH] = p
            fstate[s, F_LOW] = p
            fstate[s, F_CLOSE] = p
            fstate[s, F_VOLUME] = q
            fstate[s, F_BUY_VOLUME] = q if is_buy[i] else 0.0
            istate[s, I_NTRADES] = 1
        elif bar > current:
            _roll_bars(s, bar, fstate, istate, closes, volumes, rsi_period)
            istate[s, I_BAR] = bar
            fstate[s, F_OPEN] = p
            fstate[s, F_HIGH] = p
            fstate[s, F_LOW] = p
            fstate[s, F_CLOSE] = p
            fstate[s, F_VOLUME] = q
            fstate[s, F_BUY_VOLUME] = q if is_buy[i] else 0.0
            istate[s, I_NTRADES] = 1
        elif bar == current or ts >= current * bar_ns - late_tolerance_ns:
            # Same bar, or a little late: it counts into the open bar.
            fstate[s, F_HIGH] = max(fstate[s, F_HIGH], p)
            fstate[s, F_LOW] = min(fstate[s, F_LOW], p)
            fstate[s, F_CLOSE] = p
            fstate[s, F_VOLUME] += q
            if is_buy[i]:
                fstate[s, F_BUY_VOLUME] += q
            istate[s, I_NTRADES] += 1
        else:
            status[i] = STATUS_LATE
            ready[i] = False
            for j in range(out.shape[1]):
                out[i, j] = NAN
            continue
        if ts > istate[s, I_LAST_NS]:
            istate[s, I_LAST_NS] = ts
        _features(
            s,
            p,
            fstate,
            istate,
            closes,
            volumes,
            return_bars,
            rsi_period,
            bb_period,
            bb_k,
            vol_bars,
            out,
            ready,
            i,
        )


@njit(cache=True)
def _features(
    s: int,
    p: float,
    fstate: np.ndarray,
    istate: np.ndarray,
    closes: np.ndarray,
    volumes: np.ndarray,
    return_bars: int,
    rsi_period: int,
    bb_period: int,
    bb_k: float,
    vol_bars: int,
    out: np.ndarray,
    ready: np.ndarray,
    i: int,
) -> None:
    """Features of symbol `s` with the open bar provisionally closed at price `p`."""
    nbars = istate[s, I_NBARS]
    head = istate[s, I_HEAD]
    ok = True

    # return_24h: log return against the close `return_bars` bars back
    if nbars >= return_bars:
        out[i, 0] = math.log(p / _recent(closes, s, head, return_bars))
    else:
        out[i, 0] = NAN
        ok = False

    # rsi_14: Wilder, seeded with the mean of the first `rsi_period` changes (TA-Lib)
    nchanges = nbars  # completed changes (nbars - 1) plus the provisional one
    if nchanges >= rsi_period:
        change = p - _recent(closes, s, head, 1)
        gain = change if change > 0.0 else 0.0
        loss = -change if change < 0.0 else 0.0
        if nchanges == rsi_period:
            avg_gain = (fstate[s, F_AVG_GAIN] + gain) / rsi_period
            avg_loss = (fstate[s, F_AVG_LOSS] + loss) / rsi_period
        else:
            avg_gain = (fstate[s, F_AVG_GAIN] * (rsi_period - 1) + gain) / rsi_period
            avg_loss = (fstate[s, F_AVG_LOSS] * (rsi_period - 1) + loss) / rsi_period
        total = avg_gain + avg_loss
        out[i, 1] = 100.0 * avg_gain / total if total != 0.0 else 0.0
    else:
        out[i, 1] = NAN
        ok = False

    # bb_pos_20: position inside the Bollinger band of the last bb_period closes
    if nbars >= bb_period - 1:
        mean = p
        for k in range(1, bb_period):
            mean += _recent(closes, s, head, k)
        mean /= bb_period
        var = (p - mean) * (p - mean)
        for k in range(1, bb_period):
            d = _recent(closes, s, head, k) - mean
            var += d * d
        std = math.sqrt(var / bb_period)
        if std > 0.0:
            lower = mean - bb_k * std
            out[i, 2] = (p - lower) / (2.0 * bb_k * std)
        else:
            out[i, 2] = 0.5
    else:
        out[i, 2] = NAN
        ok = False

    # vol_ratio_24: open-bar volume over the mean of the last vol_bars completed bars
    if nbars >= vol_bars:
        total_volume = 0.0
        for k in range(1, vol_bars + 1):
            total_volume += _recent(volumes, s, head, k)
        if total_volume > 0.0:
            out[i, 3] = fstate[s, F_VOLUME] * vol_bars / total_volume
        else:
            out[i, 3] = NAN
            ok = False
    else:
        out[i, 3] = NAN
        ok = False

    ready[i] = ok
