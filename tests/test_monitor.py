"""The live quality monitor: known-truth accuracy and PSI, the worker's summaries, the faust app."""

from __future__ import annotations

import numpy as np

from features.spec import FeatureSpec
from stream.contracts.summary import BatchSummary
from stream.monitor.judge import Judge
from stream.monitor.quality import psi
from stream.monitor.reference import Reference
from stream.monitor.testing import known_truth
from training.dataset import forward_labels
from training.report import reference_histograms

BAR_NS = 60_000_000_000
SPEC = FeatureSpec(bar_ns=BAR_NS)


def _reference(version: str = "1", rows: int = 20_000) -> Reference:
    X = np.random.default_rng(1).normal(0.0, 1.0, (rows, SPEC.n_features))
    return Reference.from_histograms("synthetic", version, reference_histograms(X, SPEC))


def _judge_all(summaries: list[BatchSummary], reference: Reference | None = None):
    judge = Judge(BAR_NS, horizon_bars=1)
    hits = calls = 0
    bins: dict[str, np.ndarray] = {}
    for summary in summaries:
        # through the wire format, as the monitor receives them
        deltas = judge.add([BatchSummary.decode(summary.encode())], reference)
        for h, c in deltas.calls.values():
            hits, calls = hits + h, calls + c
        for name, counts in deltas.bins.items():
            bins[name] = bins.get(name, 0) + counts
    return hits, calls, bins


def test_a_model_right_70_percent_of_the_time_scores_0_70() -> None:
    feed = known_truth(accuracy=0.7)
    hits, calls, _ = _judge_all(feed.summaries)
    assert calls == feed.calls  # every call whose horizon passed, and no other
    assert hits == feed.hits
    assert abs(hits / calls - 0.70) <= 0.03


def test_the_monitor_judges_with_the_training_labels() -> None:
    """Hits over a random walk equal those computed with training's forward_labels."""
    import pandas as pd

    rng = np.random.default_rng(3)
    n = 20_000
    event_ns = np.sort(rng.integers(0, 40 * BAR_NS, n))
    price = np.round(100 + np.cumsum(rng.normal(0, 0.05, n)), 2)  # ties: labels of NaN
    direction = rng.choice([1, -1], n).astype(np.int8)
    frame = pd.DataFrame({"symbol": ["A"] * n, "event_ns": event_ns, "price": price})
    labels = forward_labels(frame, BAR_NS, 1)
    judged = ~np.isnan(labels.label) & (labels.end_ns <= event_ns[-1])
    expected = int((((labels.label == 1.0) == (direction == 1)) & judged).sum())
    summaries = [
        BatchSummary(
            "m",
            "1",
            ("A",),
            np.zeros(len(rows), np.int32),
            event_ns[rows],
            price[rows],
            direction[rows],
            np.zeros((len(rows), SPEC.n_features), np.float32),
        )
        for rows in np.array_split(np.arange(n), 37)
    ]
    hits, calls, _ = _judge_all(summaries)
    assert calls == int(judged.sum())
    assert hits == expected


def test_psi_flags_a_shifted_feature_and_not_an_unshifted_one() -> None:
    reference = _reference()
    feed = known_truth(shift={0: 1.0}, ticks_per_bar=20)
    _, _, bins = _judge_all(feed.summaries, reference)
    shifted = psi(reference.counts[SPEC.names[0]], bins[SPEC.names[0]])
    steady = [psi(reference.counts[name], bins[name]) for name in SPEC.names[1:]]
    assert shifted > 0.25
    assert max(steady) < 0.05


def test_psi_bins_only_the_reference_version() -> None:
    feed = known_truth(version="2", ticks_per_bar=5)
    _, _, bins = _judge_all(feed.summaries, _reference(version="1"))
    assert bins == {}
