"""Recovery: snapshots reflect applied offsets, restore seeks and replays, gaps are counted."""

from __future__ import annotations

import asyncio

import numpy as np
from aiokafka import TopicPartition

from features.engine import FeatureEngine
from features.spec import FeatureSpec
from features.testing import MemorySnapshots
from stream.kafka.testing import FakeSource, fetched_of
from stream.worker.recovery import OFFSET_GAPS, Recovery

TP0, TP1 = TopicPartition("ticks", 0), TopicPartition("ticks", 1)


def _engine_with(symbols: list[str]) -> FeatureEngine:
    engine = FeatureEngine(FeatureSpec())
    slots = engine.slots(symbols)
    n = len(symbols)
    engine.update(
        slots,
        np.arange(1, n + 1, dtype=np.int64) * 1_000_000_000,
        np.linspace(1.0, 2.0, n),
        np.ones(n),
        np.ones(n, np.bool_),
    )
    return engine


def test_a_snapshot_restores_the_state_and_replays_up_to_the_commit() -> None:
    async def main() -> None:
        store = MemorySnapshots()
        engine = _engine_with(["A", "B"])
        before = Recovery(engine, store, interval_s=10.0)
        before.pin(["A", "B"], [0, 1])
        before.applied({TP0: 40, TP1: 7})
        await before.write(before.take([TP0]))
        assert set(store.saved) == {("ticks", 0)}

        fresh = FeatureEngine(FeatureSpec())
        after = Recovery(fresh, store, interval_s=10.0)
        source = FakeSource()
        source.committed_offsets = {TP0: 55, TP1: 3}
        starts = await after.restore(source, {TP0, TP1})
        # TP0 from its snapshot; TP1 has none: rebuilt from the start
        assert starts == {TP0: 40, TP1: 0}
        assert sorted(source.seeks) == [(TP0, 40), (TP1, -1)]
        assert after.replay_until == {TP0: 55, TP1: 3}
        np.testing.assert_array_equal(
            fresh.fstate[fresh.slot_of["A"]], engine.fstate[engine.slot_of["A"]]
        )
        assert after.partition_of == {"A": 0}

        # records before the committed offset already have signals
        fetched = fetched_of(
            "ticks", [(0, 53, b"A", b"x"), (0, 54, b"A", b"y"), (0, 55, None, b"z")]
        )
        assert after.replayed(fetched).tolist() == [True, True, False]  # type: ignore[union-attr]
        assert TP0 not in after.replay_until  # replay done for TP0
        after.forget({TP1})
        assert after.replayed(fetched_of("ticks", [(0, 56, None, b"w")])) is None

    asyncio.run(main())


def test_nothing_is_snapshotted_without_a_store_or_while_replaying() -> None:
    engine = _engine_with(["A"])
    assert Recovery(engine, None, 10.0).take() == []
    recovery = Recovery(engine, MemorySnapshots(), 10.0)
    recovery.pin(["A"], [0])
    recovery.applied({TP0: 5})
    recovery.replay_until[TP0] = 9
    assert recovery.take() == []  # the state is behind the commit


def test_a_batch_that_skips_offsets_is_counted() -> None:
    recovery = Recovery(FeatureEngine(FeatureSpec()), None, 10.0)
    recovery.applied({TP0: 10})
    before = OFFSET_GAPS._value.get()
    recovery.check_gaps(fetched_of("ticks", [(0, 10, None, b"a")]))
    assert OFFSET_GAPS._value.get() == before
    recovery.check_gaps(fetched_of("ticks", [(0, 12, None, b"a")]))
    assert OFFSET_GAPS._value.get() == before + 1
