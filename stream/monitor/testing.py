"""A synthetic feed of micro-batch summaries with known truth (tests, `python -m bench monitor`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stream.contracts.signal import DOWN, UP
from stream.contracts.summary import BatchSummary

T0_NS = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z


@dataclass(frozen=True, slots=True)
class KnownTruth:
    """Summaries of a market whose realized directions are known by construction.

    Every tick of a bar trades at the bar's level and the level always moves between
    bars, so with a one-bar horizon a tick's realized direction is the sign of the
    next bar's move. The last two bars of each symbol have no judged call (nothing
    trades at or after their horizon end).

    Attributes:
        summaries: The micro-batches, in stream order.
        calls: Calls that a monitor must judge.
        hits: How many of them are right.
    """

    summaries: list[BatchSummary]
    calls: int
    hits: int

    @property
    def ticks(self) -> int:
        """Ticks in all summaries."""
        return sum(len(s) for s in self.summaries)


def known_truth(
    accuracy: float = 0.7,
    symbols: int = 5,
    bars: int = 60,
    ticks_per_bar: int = 100,
    batch: int = 500,
    bar_ns: int = 60_000_000_000,
    shift: dict[int, float] | None = None,
    model: str = "synthetic",
    version: str = "1",
    seed: int = 7,
) -> KnownTruth:
    """A feed whose model is right with probability `accuracy`.

    Args:
        accuracy: Chance that a call matches the realized direction.
        symbols: Symbols, interleaved by event time.
        bars: Bars per symbol.
        ticks_per_bar: Ticks per symbol and bar (random times inside the bar).
        batch: Ticks per summary.
        bar_ns: Bar length (the monitor must judge on the same).
        shift: Feature column -> mean shift; features are N(0, 1) plus the shift.
        model: Model name in the summaries.
        version: Model version in the summaries.
        seed: Random seed.
    """
    rng = np.random.default_rng(seed)
    n_bar = symbols * ticks_per_bar
    bar = np.repeat(np.arange(bars), n_bar)
    symbol = np.tile(np.repeat(np.arange(symbols), ticks_per_bar), bars)
    offset = rng.integers(0, bar_ns, bars * n_bar)
    event_ns = T0_NS + bar * bar_ns + offset
    moves = rng.uniform(0.1, 1.0, (bars, symbols)) * rng.choice([-1.0, 1.0], (bars, symbols))
    level = 100.0 + np.cumsum(moves, axis=0)  # (bars, symbols)
    price = level[bar, symbol]
    up_next = np.zeros((bars, symbols), bool)
    up_next[:-1] = level[1:] > level[:-1]
    truth = np.where(up_next[bar, symbol], UP, DOWN)
    right = rng.random(len(bar)) < accuracy
    direction = np.where(right, truth, -truth).astype(np.int8)
    judged = bar < bars - 2
    order = np.argsort(event_ns, kind="stable")
    features = rng.normal(0.0, 1.0, (len(bar), 12))
    for column, delta in (shift or {}).items():
        features[:, column] += delta
    names = tuple(f"S{i}" for i in range(symbols))
    summaries = []
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        summaries.append(
            BatchSummary(
                model,
                version,
                names,
                symbol[rows].astype(np.int32),
                event_ns[rows],
                price[rows],
                direction[rows],
                features[rows].astype(np.float32),
            )
        )
    return KnownTruth(summaries, int(judged.sum()), int((judged & right).sum()))


def register_reference(tracking_uri: str, name: str, alias: str, seed: int = 1) -> str:
    """Register a version of `name` at `alias` whose run has N(0, 1) reference histograms.

    No model file: enough for the monitor, which reads only the histograms and the
    run's `horizon_bars` (1). Returns the version.
    """
    import json

    from features.spec import FeatureSpec
    from inference.registry import REFERENCE_ARTIFACT, open_client
    from training.report import reference_histograms

    spec = FeatureSpec()
    client = open_client(tracking_uri)
    experiment = client.create_experiment(f"{name}-reference")
    run_id = client.create_run(experiment).info.run_id
    client.log_param(run_id, "horizon_bars", 1)
    X = np.random.default_rng(seed).normal(0.0, 1.0, (20_000, spec.n_features))
    client.log_text(run_id, json.dumps(reference_histograms(X, spec)), REFERENCE_ARTIFACT)
    client.set_terminated(run_id)
    client.create_registered_model(name)
    version = str(client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id).version)
    client.set_registered_model_alias(name, alias, version)
    return version
