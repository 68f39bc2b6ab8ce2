"""LatestRows: the newest ready row per symbol, offered to the online writer when due."""

from __future__ import annotations

import numpy as np

from features.engine import FeatureEngine
from features.latest import LatestRows
from features.spec import FeatureSpec
from features.testing import RecordingWriter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_newest_ready_row_is_kept_and_offered_once_per_interval() -> None:
    engine = FeatureEngine(FeatureSpec(), initial_symbols=2)
    n = engine.spec.n_features
    writer, clock = RecordingWriter(), Clock()
    rows = LatestRows(engine, writer, interval_s=1.0, clock=clock)
    slots = engine.slots(["A", "B", "A"])
    values = np.arange(3 * n, dtype=np.float64).reshape(3, n)
    rows.publish(np.array([1, 2, 3]), values, np.array([True, False, True]), slots)
    latest = rows.latest("A")
    assert latest is not None and latest[0] == 3
    np.testing.assert_array_equal(latest[1], values[2])
    assert rows.latest("B") is None  # no ready row yet
    assert rows.latest("C") is None  # never seen
    [(symbols, event_ns, offered)] = writer.offers
    assert symbols == ["A"] and event_ns.tolist() == [3]

    rows.publish(np.array([4]), values[:1], np.array([True]), engine.slots(["B"]))
    assert len(writer.offers) == 1  # not due yet
    clock.now += 1.0
    rows.offer(force=False)
    assert writer.offers[-1][0] == ["B"]
    rows.offer(force=True)
    assert len(writer.offers) == 2  # nothing updated since


def test_rows_follow_the_engine_when_it_grows() -> None:
    engine = FeatureEngine(FeatureSpec(), initial_symbols=1)
    n = engine.spec.n_features
    rows = LatestRows(engine)
    names = [f"S{i}" for i in range(5)]
    slots = engine.slots(names)
    rows.publish(np.arange(5), np.ones((5, n)), np.ones(5, np.bool_), slots)
    assert all(rows.latest(name) is not None for name in names)
