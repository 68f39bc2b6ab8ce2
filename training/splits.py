"""Time splits without leakage: purged walk-forward folds with an embargo (Lopez de Prado)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tickserve.errors import ConfigError, DataError


@dataclass(frozen=True, slots=True)
class Fold:
    """Row indices of one fold; every test row is later than every train row's label window."""

    train: np.ndarray
    test: np.ndarray


def purged_folds(
    event_ns: np.ndarray,
    label_end_ns: np.ndarray,
    n_folds: int,
    purge_ns: int = 0,
    embargo_ns: int = 0,
    walk_forward: bool = True,
    min_label_ns: int = 0,
) -> list[Fold]:
    """Split rows by time into `n_folds + 1` equal blocks; fold k tests on block k.

    A training row is kept only if its label window, widened by `purge_ns`, ends
    before the test block starts (purging). With `walk_forward` (the default) the
    training rows of fold k are the earlier blocks only; otherwise rows after the
    test block train too, except those starting before the test labels end plus
    `embargo_ns` (the embargo).

    Args:
        event_ns: Row event times.
        label_end_ns: End (exclusive) of each row's label window.
        n_folds: Folds to return (the last one tests on the latest block).
        purge_ns: Extra gap between a training label window and the test block.
        embargo_ns: Gap after the test block's label windows; at least `min_label_ns`.
        walk_forward: Train on the past only.
        min_label_ns: The label horizon the embargo must cover.

    Raises:
        ConfigError: An embargo shorter than the label horizon, or fewer than 1 fold.
        DataError: Too few rows for that many folds, or a fold left without training rows.
    """
    if n_folds < 1:
        raise ConfigError(f"need at least 1 fold, got {n_folds}")
    if embargo_ns < min_label_ns:
        raise ConfigError(
            f"embargo of {embargo_ns} ns is shorter than the label horizon {min_label_ns} ns"
        )
    n = len(event_ns)
    if n < 2 * (n_folds + 1):
        raise DataError(f"need at least {2 * (n_folds + 1)} rows for {n_folds} folds, got {n}")
    order = np.argsort(event_ns, kind="stable")
    blocks = np.array_split(order, n_folds + 1)
    folds = []
    for k in range(1, n_folds + 1):
        test = blocks[k]
        test_start = int(event_ns[test].min())
        before = np.concatenate(blocks[:k])
        train = before[label_end_ns[before] + purge_ns <= test_start]
        if not walk_forward and k < n_folds:
            after = np.concatenate(blocks[k + 1 :])
            free_from = int(label_end_ns[test].max()) + embargo_ns
            train = np.concatenate([train, after[event_ns[after] >= free_from]])
        if len(train) == 0:
            raise DataError(f"fold {k} has no training rows left after purging")
        folds.append(Fold(np.sort(train), np.sort(test)))
    return folds
