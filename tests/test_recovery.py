"""Recovery: snapshots reflect applied offsets, restore seeks and replays, gaps are counted."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from aiokafka import TopicPartition

from features import snapshot
from features.engine import FeatureEngine
from features.snapshot import Snapshot
from features.spec import FeatureSpec
from features.testing import MemorySnapshots
from stream.kafka.testing import FakeSource, fetched_of
from stream.worker import recovery
from stream.worker.recovery import OFFSET_GAPS, STALE_POSITIONS, Recovery

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


def test_positions_past_the_log_are_not_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker restarted empty: snapshot at 38378 and commit at 38400, log ends at 8400."""
    monkeypatch.setattr(recovery, "RANGE_RECHECK_S", 0.0)

    async def main() -> None:
        store = MemorySnapshots()
        engine = _engine_with(["A", "B"])
        before = Recovery(engine, store, interval_s=10.0)
        before.pin(["A", "B"], [0, 1])
        before.applied({TP0: 38_378, TP1: 500})
        await before.write(before.take())

        after = Recovery(FeatureEngine(FeatureSpec()), store, interval_s=10.0)
        source = FakeSource()
        source.committed_offsets = {TP0: 38_400, TP1: 600}
        source.log_ranges = {TP0: (0, 8_400), TP1: (0, 9_000)}  # TP1's positions hold
        stale = STALE_POSITIONS.labels("snapshot")._value.get()
        starts = await after.restore(source, {TP0, TP1})
        # TP0 is rebuilt from the log's start and every record it holds gets a signal
        assert starts == {TP0: 0, TP1: 500}
        assert sorted(source.seeks) == [(TP0, -1), (TP1, 500)]
        assert after.replay_until == {TP1: 600}
        assert "committed offset 38400 outside the log [0, 8400]" in after.rebuilt[TP0]
        assert TP1 not in after.rebuilt
        assert STALE_POSITIONS.labels("snapshot")._value.get() == stale + 1
        assert "A" not in after.engine.slot_of  # the stale snapshot was not restored

    asyncio.run(main())


def test_a_snapshot_the_log_no_longer_holds_is_rebuilt_up_to_a_good_commit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(recovery, "RANGE_RECHECK_S", 0.0)

    async def main() -> None:
        store = MemorySnapshots()
        before = Recovery(_engine_with(["A"]), store, interval_s=10.0)
        before.pin(["A"], [0])
        before.applied({TP0: 9_000})
        await before.write(before.take())
        after = Recovery(FeatureEngine(FeatureSpec()), store, interval_s=10.0)
        source = FakeSource()
        source.committed_offsets = {TP0: 800}  # an offset reset moved the group back
        source.log_ranges = {TP0: (0, 1_000)}
        assert await after.restore(source, {TP0}) == {TP0: 0}
        assert after.replay_until == {TP0: 800}  # no duplicates before the commit

    asyncio.run(main())


def test_a_snapshot_from_another_log_of_the_topic_is_not_trusted() -> None:
    """A broker restarted empty, refilled with as many records as before: offsets match."""

    async def main() -> None:
        store = MemorySnapshots()
        before = Recovery(_engine_with(["A", "B"]), store, interval_s=10.0)
        old_log = FakeSource()
        old_log.topic_id = "0a" * 16
        await before.restore(old_log, {TP0, TP1})  # learns the topic's id
        before.pin(["A", "B"], [0, 1])
        before.applied({TP0: 500, TP1: 500})
        await before.write(before.take())
        assert store.load("ticks", 0).log_id == "0a" * 16  # type: ignore[union-attr]

        after = Recovery(FeatureEngine(FeatureSpec()), store, interval_s=10.0)
        new_log = FakeSource()
        new_log.topic_id = "0b" * 16
        new_log.log_ranges = {TP0: (0, 500), TP1: (0, 500)}  # the snapshots' offsets fit
        stale = STALE_POSITIONS.labels("snapshot")._value.get()
        assert await after.restore(new_log, {TP0, TP1}) == {TP0: 0, TP1: 0}
        assert sorted(new_log.seeks) == [(TP0, -1), (TP1, -1)]
        assert after.replay_until == {}  # no commit in the new log: every record is signalled
        assert "another log of the topic" in after.rebuilt[TP0]
        assert STALE_POSITIONS.labels("snapshot")._value.get() == stale + 2
        assert "A" not in after.engine.slot_of

        same = Recovery(FeatureEngine(FeatureSpec()), store, interval_s=10.0)
        old_log.seeks.clear()
        assert await same.restore(old_log, {TP0}) == {TP0: 500}  # the same log: restored
        assert "A" in same.engine.slot_of and not same.rebuilt

    asyncio.run(main())


def test_a_snapshot_without_a_log_id_is_checked_by_its_offsets_alone() -> None:
    """Snapshots written before log ids, or by a client that gets none, still restore."""

    async def main() -> None:
        store = MemorySnapshots()
        before = Recovery(_engine_with(["A"]), store, interval_s=10.0)
        before.pin(["A"], [0])
        before.applied({TP0: 500})
        await before.write(before.take())
        after = Recovery(FeatureEngine(FeatureSpec()), store, interval_s=10.0)
        source = FakeSource()
        source.topic_id = "0b" * 16
        assert await after.restore(source, {TP0}) == {TP0: 500}

    asyncio.run(main())


def test_a_snapshot_keeps_its_log_id_through_redis_bytes() -> None:
    engine = _engine_with(["A", "B"])
    snap = snapshot.take(engine, ["A", "B"], 500, log_id="00" * 15 + "ff")
    back = Snapshot.decode(snap.encode())
    assert (back.next_offset, back.symbols, back.log_id) == (500, ["A", "B"], "00" * 15 + "ff")
    np.testing.assert_array_equal(back.rings, snap.rings)
    # one written before log ids were: no log_id array in the .npz
    buf = io.BytesIO()
    np.savez(
        buf,
        next_offset=np.int64(7),
        spec_hash=np.str_(snap.spec_hash),
        symbols=np.array(["A"], dtype=np.str_),
        fstate=snap.fstate[:1],
        istate=snap.istate[:1],
        rings=snap.rings[:1],
    )
    assert Snapshot.decode(buf.getvalue()).log_id == ""
