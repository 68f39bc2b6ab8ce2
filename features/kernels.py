"""Numba kernels: time bars and per-tick features over a whole micro-batch, O(1) work per tick.

State lives in preallocated arrays indexed by a symbol slot (see `features.engine`):
`fstate[slot, F_*]` (floats), `istate[slot, I_*]` (ints) and ring buffers of
completed bars `rings[slot, R_*, k]`. Every tick updates the open bar and emits
the features as if the open bar closed at that tick's price, so values move on
every tick, and a completed bar's last tick carries exactly the value a batch
indicator (TA-Lib) gives for that bar.

Per tick the work is O(1): window statistics over completed bars (Bollinger mean
and sum of squared deviations, realized volatility, volume sums) are recomputed
two-pass (no catastrophic cancellation on prices like 60000.01) only when a bar
completes, and the open bar's value joins them by one Welford step.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# fstate columns: the open bar, then indicator state of completed bars
F_OPEN, F_HIGH, F_LOW, F_CLOSE, F_VOLUME, F_BUY, F_PV = 0, 1, 2, 3, 4, 5, 6
F_AVG_GAIN, F_AVG_LOSS = 7, 8  # Wilder averages (sums while seeding)
F_EMA_FAST, F_EMA_SLOW = 9, 10  # EMAs of completed closes (sums while seeding)
F_BB_MEAN, F_BB_M2 = 11, 12  # over the last bb_period - 1 completed closes
F_RV_MEAN, F_RV_M2 = 13, 14  # over the last rv_bars - 1 completed one-bar log returns
F_VOL_SUM, F_BUY_SUM, F_PV_SUM = 15, 16, 17  # over the last volume_bars completed bars
N_FSTATE = 18
# istate columns
I_BAR, I_NBARS, I_HEAD, I_NTRADES, I_LAST_NS, I_NTICKS = 0, 1, 2, 3, 4, 5
N_ISTATE = 6
# ring buffer fields (completed bars)
R_CLOSE, R_VOLUME, R_BUY, R_PV = 0, 1, 2, 3
N_RINGS = 4
# iparams: the FeatureSpec as the kernels read it (built by FeatureEngine)
P_BAR_NS, P_LATE_NS, P_RET_A, P_RET_B, P_RET_LONG, P_RSI = 0, 1, 2, 3, 4, 5
P_BB, P_VOLUME_BARS, P_RV, P_EMA_FAST, P_EMA_SLOW = 6, 7, 8, 9, 10
N_IPARAMS = 11

STATUS_OK = 0
STATUS_LATE = 1

NAN = np.nan


@njit(cache=True, inline="always")
def _recent(rings: np.ndarray, s: int, field: int, head: int, k: int) -> float:
    """k-th most recent completed value (k=1 is the last completed bar)."""
    return float(rings[s, field, (head - k) % rings.shape[2]])


@njit(cache=True, inline="always")
def _ema_push(fstate: np.ndarray, s: int, col: int, close: float, n: int, period: int) -> None:
    """Add the n-th completed close to an EMA seeded with the simple mean (TA-Lib)."""
    if n < period:
        fstate[s, col] += close
    elif n == period:
        fstate[s, col] = (fstate[s, col] + close) / period
    else:
        fstate[s, col] += 2.0 / (period + 1) * (close - fstate[s, col])


@njit(cache=True, inline="always")
def _ema_now(fstate: np.ndarray, s: int, col: int, p: float, n: int, period: int) -> float:
    """The EMA with the open bar provisionally closed at p (n closes in all)."""
    if n < period:
        return NAN
    if n == period:
        return float((fstate[s, col] + p) / period)
    return float(fstate[s, col] + 2.0 / (period + 1) * (p - fstate[s, col]))


@njit(cache=True)
def _complete_bar(
    s: int,
    close: float,
    volume: float,
    buy: float,
    pv: float,
    fstate: np.ndarray,
    istate: np.ndarray,
    rings: np.ndarray,
    ip: np.ndarray,
) -> None:
    """Push one completed bar into the rings and advance RSI and EMA state."""
    nbars = istate[s, I_NBARS]
    head = istate[s, I_HEAD]
    rsi_period = ip[P_RSI]
    if nbars >= 1:
        change = close - _recent(rings, s, R_CLOSE, head, 1)
        gain = change if change > 0.0 else 0.0
        loss = -change if change < 0.0 else 0.0
        if nbars <= rsi_period:  # nbars = changes seen once this one counts
            fstate[s, F_AVG_GAIN] += gain
            fstate[s, F_AVG_LOSS] += loss
            if nbars == rsi_period:
                fstate[s, F_AVG_GAIN] /= rsi_period
                fstate[s, F_AVG_LOSS] /= rsi_period
        else:
            fstate[s, F_AVG_GAIN] = (fstate[s, F_AVG_GAIN] * (rsi_period - 1) + gain) / rsi_period
            fstate[s, F_AVG_LOSS] = (fstate[s, F_AVG_LOSS] * (rsi_period - 1) + loss) / rsi_period
    _ema_push(fstate, s, F_EMA_FAST, close, nbars + 1, ip[P_EMA_FAST])
    _ema_push(fstate, s, F_EMA_SLOW, close, nbars + 1, ip[P_EMA_SLOW])
    rings[s, R_CLOSE, head] = close
    rings[s, R_VOLUME, head] = volume
    rings[s, R_BUY, head] = buy
    rings[s, R_PV, head] = pv
    istate[s, I_HEAD] = (head + 1) % rings.shape[2]
    istate[s, I_NBARS] = nbars + 1


@njit(cache=True)
def _refresh_windows(
    s: int, fstate: np.ndarray, istate: np.ndarray, rings: np.ndarray, ip: np.ndarray
) -> None:
    """Two-pass window statistics of completed bars; runs once per completed bar."""
    nbars = istate[s, I_NBARS]
    head = istate[s, I_HEAD]
    m = ip[P_BB] - 1
    if nbars >= m:
        mean = 0.0
        for k in range(1, m + 1):
            mean += _recent(rings, s, R_CLOSE, head, k)
        mean /= m
        m2 = 0.0
        for k in range(1, m + 1):
            d = _recent(rings, s, R_CLOSE, head, k) - mean
            m2 += d * d
        fstate[s, F_BB_MEAN] = mean
        fstate[s, F_BB_M2] = m2
    m = ip[P_RV] - 1
    if nbars >= m + 1:
        mean = 0.0
        for k in range(1, m + 1):
            c1 = _recent(rings, s, R_CLOSE, head, k)
            mean += math.log(c1 / _recent(rings, s, R_CLOSE, head, k + 1))
        mean /= m
        m2 = 0.0
        for k in range(1, m + 1):
            c1 = _recent(rings, s, R_CLOSE, head, k)
            d = math.log(c1 / _recent(rings, s, R_CLOSE, head, k + 1)) - mean
            m2 += d * d
        fstate[s, F_RV_MEAN] = mean
        fstate[s, F_RV_M2] = m2
    m = ip[P_VOLUME_BARS]
    if nbars >= m:
        vol = 0.0
        buy = 0.0
        pv = 0.0
        for k in range(1, m + 1):
            vol += _recent(rings, s, R_VOLUME, head, k)
            buy += _recent(rings, s, R_BUY, head, k)
            pv += _recent(rings, s, R_PV, head, k)
        fstate[s, F_VOL_SUM] = vol
        fstate[s, F_BUY_SUM] = buy
        fstate[s, F_PV_SUM] = pv


@njit(cache=True)
def _roll_bars(
    s: int, bar: int, fstate: np.ndarray, istate: np.ndarray, rings: np.ndarray, ip: np.ndarray
) -> None:
    """Close the open bar and any empty bars up to `bar` (flat close, zero volume)."""
    close = fstate[s, F_CLOSE]
    _complete_bar(
        s, close, fstate[s, F_VOLUME], fstate[s, F_BUY], fstate[s, F_PV], fstate, istate, rings, ip
    )
    gap = bar - istate[s, I_BAR] - 1
    # Past the rings plus the longest seed, more flat bars only decay the RSI
    # averages and pull the EMAs towards the close, geometrically: closed form.
    cap = rings.shape[2] + max(ip[P_RSI], ip[P_EMA_SLOW]) + 1
    for _ in range(min(gap, cap)):
        _complete_bar(s, close, 0.0, 0.0, 0.0, fstate, istate, rings, ip)
    if gap > cap:
        rest = gap - cap
        decay = ((ip[P_RSI] - 1) / ip[P_RSI]) ** rest
        fstate[s, F_AVG_GAIN] *= decay
        fstate[s, F_AVG_LOSS] *= decay
        for col, period in ((F_EMA_FAST, ip[P_EMA_FAST]), (F_EMA_SLOW, ip[P_EMA_SLOW])):
            keep = (1.0 - 2.0 / (period + 1)) ** rest
            fstate[s, col] = close + (fstate[s, col] - close) * keep
        istate[s, I_NBARS] += rest
    _refresh_windows(s, fstate, istate, rings, ip)


@njit(cache=True, inline="always")
def _open_bar(
    s: int, bar: int, p: float, q: float, buy: bool, fstate: np.ndarray, istate: np.ndarray
) -> None:
    istate[s, I_BAR] = bar
    fstate[s, F_OPEN] = p
    fstate[s, F_HIGH] = p
    fstate[s, F_LOW] = p
    fstate[s, F_CLOSE] = p
    fstate[s, F_VOLUME] = q
    fstate[s, F_BUY] = q if buy else 0.0
    fstate[s, F_PV] = p * q
    istate[s, I_NTRADES] = 1


@njit(cache=True)
def update_batch(
    slots: np.ndarray,
    event_ns: np.ndarray,
    price: np.ndarray,
    quantity: np.ndarray,
    is_buy: np.ndarray,
    fstate: np.ndarray,
    istate: np.ndarray,
    rings: np.ndarray,
    ip: np.ndarray,
    bb_k: float,
    out: np.ndarray,
    ready: np.ndarray,
    status: np.ndarray,
) -> None:
    """Apply a micro-batch of ticks in order and write one feature row per tick.

    Columns of `out` follow `spec.FEATURE_NAMES`. A late tick (older than its
    symbol's open bar minus the tolerance) leaves the state untouched and gets
    status LATE with NaN features.
    """
    bar_ns = ip[P_BAR_NS]
    for i in range(slots.shape[0]):
        s = slots[i]
        ts = event_ns[i]
        p = price[i]
        q = quantity[i]
        bar = ts // bar_ns
        current = istate[s, I_BAR]
        status[i] = STATUS_OK
        if current < 0:
            _open_bar(s, bar, p, q, is_buy[i], fstate, istate)
        elif bar > current:
            _roll_bars(s, bar, fstate, istate, rings, ip)
            _open_bar(s, bar, p, q, is_buy[i], fstate, istate)
        elif bar == current or ts >= current * bar_ns - ip[P_LATE_NS]:
            # Same bar, or a little late: it counts into the open bar.
            fstate[s, F_HIGH] = max(fstate[s, F_HIGH], p)
            fstate[s, F_LOW] = min(fstate[s, F_LOW], p)
            fstate[s, F_CLOSE] = p
            fstate[s, F_VOLUME] += q
            if is_buy[i]:
                fstate[s, F_BUY] += q
            fstate[s, F_PV] += p * q
            istate[s, I_NTRADES] += 1
        else:
            status[i] = STATUS_LATE
            ready[i] = False
            for j in range(out.shape[1]):
                out[i, j] = NAN
            continue
        if istate[s, I_NTICKS] > 0:
            out[i, 11] = max(ts - istate[s, I_LAST_NS], 0) / 1e9
        else:
            out[i, 11] = NAN
        if istate[s, I_NTICKS] == 0 or ts > istate[s, I_LAST_NS]:
            istate[s, I_LAST_NS] = ts
        istate[s, I_NTICKS] += 1
        ready[i] = (
            _features(s, p, fstate, istate, rings, ip, bb_k, out, i) and istate[s, I_NTICKS] > 1
        )


@njit(cache=True)
def _features(
    s: int,
    p: float,
    fstate: np.ndarray,
    istate: np.ndarray,
    rings: np.ndarray,
    ip: np.ndarray,
    bb_k: float,
    out: np.ndarray,
    i: int,
) -> bool:
    """Columns 0-10 for symbol `s` with the open bar provisionally closed at `p`."""
    nbars = istate[s, I_NBARS]
    head = istate[s, I_HEAD]
    ok = True

    # log returns against the close 1, 5 and 24 bars back
    for col, param in ((0, P_RET_A), (1, P_RET_B), (2, P_RET_LONG)):
        if nbars >= ip[param]:
            out[i, col] = math.log(p / _recent(rings, s, R_CLOSE, head, ip[param]))
        else:
            out[i, col] = NAN
            ok = False

    # rsi_14: Wilder, seeded with the mean of the first rsi_period changes (TA-Lib)
    rsi_period = ip[P_RSI]
    if nbars >= rsi_period:  # nbars - 1 completed changes, plus the provisional one
        change = p - _recent(rings, s, R_CLOSE, head, 1)
        gain = change if change > 0.0 else 0.0
        loss = -change if change < 0.0 else 0.0
        if nbars == rsi_period:
            avg_gain = (fstate[s, F_AVG_GAIN] + gain) / rsi_period
            avg_loss = (fstate[s, F_AVG_LOSS] + loss) / rsi_period
        else:
            avg_gain = (fstate[s, F_AVG_GAIN] * (rsi_period - 1) + gain) / rsi_period
            avg_loss = (fstate[s, F_AVG_LOSS] * (rsi_period - 1) + loss) / rsi_period
        total = avg_gain + avg_loss
        out[i, 3] = 100.0 * avg_gain / total if total != 0.0 else 0.0
    else:
        out[i, 3] = NAN
        ok = False

    # bb_pos_20: position in the band; the open bar joins the window by a Welford step
    n = ip[P_BB]
    if nbars >= n - 1:
        delta = p - fstate[s, F_BB_MEAN]
        mean = fstate[s, F_BB_MEAN] + delta / n
        m2 = fstate[s, F_BB_M2] + delta * (p - mean)
        std = math.sqrt(max(m2, 0.0) / n)
        out[i, 4] = (p - (mean - bb_k * std)) / (2.0 * bb_k * std) if std > 0.0 else 0.5
    else:
        out[i, 4] = NAN
        ok = False

    # volume window: vol_ratio_24, vwap_dev_24, flow_imbalance_24
    vb = ip[P_VOLUME_BARS]
    vol = fstate[s, F_VOL_SUM] + fstate[s, F_VOLUME]
    if nbars >= vb and fstate[s, F_VOL_SUM] > 0.0:
        out[i, 5] = fstate[s, F_VOLUME] * vb / fstate[s, F_VOL_SUM]
        vwap = (fstate[s, F_PV_SUM] + fstate[s, F_PV]) / vol
        out[i, 9] = p / vwap - 1.0
        out[i, 10] = (2.0 * (fstate[s, F_BUY_SUM] + fstate[s, F_BUY]) - vol) / vol
    else:
        out[i, 5] = NAN
        out[i, 9] = NAN
        out[i, 10] = NAN
        ok = False

    # realized_vol_24: population std of one-bar log returns, the open bar's included
    n = ip[P_RV]
    if nbars >= n:
        r = math.log(p / _recent(rings, s, R_CLOSE, head, 1))
        delta = r - fstate[s, F_RV_MEAN]
        mean = fstate[s, F_RV_MEAN] + delta / n
        m2 = fstate[s, F_RV_M2] + delta * (r - mean)
        out[i, 6] = math.sqrt(max(m2, 0.0) / n)
    else:
        out[i, 6] = NAN
        ok = False

    # EMA deviation and MACD, scale-free (prices may be 0.0014 or 60000)
    fast = _ema_now(fstate, s, F_EMA_FAST, p, nbars + 1, ip[P_EMA_FAST])
    slow = _ema_now(fstate, s, F_EMA_SLOW, p, nbars + 1, ip[P_EMA_SLOW])
    out[i, 7] = p / fast - 1.0
    out[i, 8] = (fast - slow) / p
    if math.isnan(slow):
        ok = False
    return ok


@njit(cache=True)
def keep_latest(
    slots: np.ndarray,
    event_ns: np.ndarray,
    values: np.ndarray,
    ready: np.ndarray,
    latest_ns: np.ndarray,
    latest_values: np.ndarray,
    updated: np.ndarray,
) -> None:
    """Copy each slot's last ready row of a batch into `latest_*` and flag it in `updated`.

    A symbol's rows arrive in event order, so its last ready row is its newest.

    >>> latest_ns, latest, updated = np.full(2, -1), np.zeros((2, 1)), np.zeros(2, np.bool_)
    >>> keep_latest(np.array([1, 1, 0]), np.array([5, 6, 7]), np.array([[1.0], [2.0], [3.0]]),
    ...             np.array([True, True, False]), latest_ns, latest, updated)
    >>> latest_ns.tolist(), latest[:, 0].tolist(), updated.tolist()
    ([-1, 6], [0.0, 2.0], [False, True])
    """
    for r in range(slots.shape[0]):
        if ready[r]:
            s = slots[r]
            latest_ns[s] = event_ns[r]
            latest_values[s, :] = values[r, :]
            updated[s] = True
