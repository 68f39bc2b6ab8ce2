"""Held-out metrics: direction accuracy, log loss, AUC, and a cost-aware backtest of the signal."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NS_PER_YEAR = 365.25 * 24 * 3600 * 1e9


@dataclass(frozen=True, slots=True)
class Backtest:
    """Per-trade P&L of the signal, in time order."""

    event_ns: np.ndarray
    position: np.ndarray  # -1, 0, +1
    pnl: np.ndarray  # return of each holding period after fees
    sharpe: float  # annualized
    max_drawdown: float  # fraction of peak equity
    total_return: float

    @property
    def equity(self) -> np.ndarray:
        """Compounded equity curve, starting at 1."""
        return np.cumprod(1.0 + self.pnl)


def non_overlapping(
    event_ns: np.ndarray, label_end_ns: np.ndarray, symbols: np.ndarray
) -> np.ndarray:
    """Row indices, per symbol, where each holding period starts after the previous one ended."""
    picked: list[int] = []
    for symbol in np.unique(symbols):
        rows = np.flatnonzero(symbols == symbol)
        rows = rows[np.argsort(event_ns[rows], kind="stable")]
        free_at = np.iinfo(np.int64).min
        for i in rows:
            if event_ns[i] >= free_at:
                picked.append(int(i))
                free_at = int(label_end_ns[i])
    out = np.array(picked, dtype=np.int64)
    return out[np.argsort(event_ns[out], kind="stable")]


def backtest(
    p_up: np.ndarray,
    fwd_return: np.ndarray,
    event_ns: np.ndarray,
    label_end_ns: np.ndarray,
    symbols: np.ndarray,
    threshold: float,
    fee_bps: float,
) -> Backtest:
    """Trade the signal over non-overlapping holding periods (each row's label window).

    Position is +1 where P(up) > 0.5 + threshold, -1 where P(up) < 0.5 - threshold,
    else flat; every change of position pays `fee_bps` per unit traded. Sharpe is
    annualized with the number of holding periods per year of the test window.

    >>> bt = backtest(np.array([0.9, 0.1, 0.5]), np.array([0.01, -0.02, 0.03]),
    ...               np.array([0, 10, 20]), np.array([10, 20, 30]), np.array(["A"] * 3), 0.1, 0.0)
    >>> bt.position.tolist(), bt.pnl.round(4).tolist()
    ([1, -1, 0], [0.01, 0.02, 0.0])
    """
    rows = non_overlapping(event_ns, label_end_ns, symbols)
    p = p_up[rows]
    position = np.where(p > 0.5 + threshold, 1, np.where(p < 0.5 - threshold, -1, 0))
    gross = position * fwd_return[rows]
    turnover = np.zeros(len(rows))
    for symbol in np.unique(symbols[rows]):
        mine = symbols[rows] == symbol
        turnover[mine] = np.abs(np.diff(position[mine], prepend=0))
    pnl = gross - turnover * fee_bps / 1e4
    equity = np.cumprod(1.0 + pnl)
    peak = np.maximum.accumulate(np.r_[1.0, equity])[1:]
    drawdown = float(np.max(1.0 - equity / peak)) if len(pnl) else 0.0
    span_years = (label_end_ns[rows].max() - event_ns[rows].min()) / NS_PER_YEAR if len(rows) else 0
    std = float(np.std(pnl))
    if len(pnl) > 1 and std > 0 and span_years > 0:
        sharpe = float(np.mean(pnl) / std * np.sqrt(len(pnl) / span_years))
    else:
        sharpe = 0.0
    total = float(equity[-1] - 1.0) if len(pnl) else 0.0
    return Backtest(event_ns[rows], position, pnl, sharpe, drawdown, total)


def classification_metrics(y: np.ndarray, p_up: np.ndarray) -> dict[str, float]:
    """Directional accuracy, log loss and AUC (NaN when the fold has one class)."""
    from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

    both = len(np.unique(y)) > 1
    return {
        "accuracy": float(accuracy_score(y, p_up >= 0.5)),
        "log_loss": float(log_loss(y, np.clip(p_up, 1e-12, 1 - 1e-12), labels=[0, 1])),
        "auc": float(roc_auc_score(y, p_up)) if both else float("nan"),
    }


def evaluate(
    y: np.ndarray,
    p_up: np.ndarray,
    fwd_return: np.ndarray,
    event_ns: np.ndarray,
    label_end_ns: np.ndarray,
    symbols: np.ndarray,
    threshold: float,
    fee_bps: float,
) -> tuple[dict[str, float], Backtest]:
    """Every held-out metric of one fold, and its backtest."""
    bt = backtest(p_up, fwd_return, event_ns, label_end_ns, symbols, threshold, fee_bps)
    metrics = classification_metrics(y, p_up)
    metrics.update(
        sharpe=bt.sharpe,
        max_drawdown=bt.max_drawdown,
        total_return=bt.total_return,
        trades=float(np.count_nonzero(bt.position)),
        periods=float(len(bt.pnl)),
    )
    return metrics, bt
