"""Figures and reference artifacts of a training run (matplotlib Agg, JSON)."""

from __future__ import annotations

from typing import Any

import numpy as np

from features.spec import FeatureSpec
from training.evaluate import Backtest


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def close(fig: Any) -> None:
    """Release a figure (pyplot keeps every open one)."""
    _pyplot().close(fig)


def feature_importance(names: tuple[str, ...], importance: np.ndarray, title: str) -> Any:
    """Horizontal bar chart of one importance value per feature."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(list(names), importance)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def confusion(y: np.ndarray, p_up: np.ndarray) -> Any:
    """2x2 confusion matrix of the direction call at 0.5."""
    from sklearn.metrics import confusion_matrix

    plt = _pyplot()
    cm = confusion_matrix(y, (p_up >= 0.5).astype(int), labels=[0, 1])
    fig, ax = plt.subplots(figsize=(3.5, 3))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center")
    ax.set_xticks([0, 1], ["down", "up"])
    ax.set_yticks([0, 1], ["down", "up"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title("test confusion matrix")
    fig.tight_layout()
    return fig


def equity_curve(bt: Backtest, title: str) -> Any:
    """Compounded equity of the backtest over the test window."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot((bt.event_ns - bt.event_ns[0]) / 3.6e12 if len(bt.event_ns) else [], bt.equity)
    ax.set_xlabel("hours into the test window")
    ax.set_ylabel("equity")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def reference_histograms(X: np.ndarray, spec: FeatureSpec, bins: int = 20) -> dict[str, Any]:
    """Per-feature histograms of the training rows (quantile edges), for drift and PSI."""
    out: dict[str, Any] = {"feature_spec_hash": spec.hash, "rows": len(X), "features": {}}
    for j, name in enumerate(spec.names):
        column = X[:, j][np.isfinite(X[:, j])]
        edges = np.unique(np.quantile(column, np.linspace(0, 1, bins + 1)))
        counts, _ = np.histogram(column, bins=edges)
        out["features"][name] = {"edges": edges.tolist(), "counts": counts.tolist()}
    return out
