"""Feature state survives SIGKILL: snapshot + replay gives the rows of an uninterrupted run."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deploy.settings import Settings
from features.engine import FeatureEngine
from features.snapshot import SnapshotStore
from inference.registry import load_model
from stream.contracts.signal import Signal
from stream.ingest.feed import Pacing, publish
from stream.kafka.clients import ensure_topics
from tests.helpers import Pipeline, fresh, read_topic, run

pytestmark = pytest.mark.services
ROOT = Path(__file__).resolve().parents[1]


def _two_symbols(pipeline: Pipeline, copies: int = 1) -> list[dict[str, object]]:
    """The real trades, plus `copies` more symbols (scaled prices), interleaved in time."""
    ticks = []
    for t in pipeline.ticks:
        ticks.append(t)
        for k in range(1, copies + 1):
            ticks.append({**t, "symbol": "XRPX/ETH" if k == 1 else f"XRP{k}/ETH",
                          "price": t["price"] * (2.0 + k),  # type: ignore[operator]
                          "trade_id": f"x{k}-{t['trade_id']}"})  # fmt: skip
    return ticks


def _expected_scores(settings: Settings, ticks: list[dict[str, object]]) -> tuple[
    dict[str, float], FeatureEngine
]:  # fmt: skip
    """Scores of one uninterrupted pass over `ticks` (NaN: not ready), and its engine."""
    spec = settings.feature_spec
    engine = FeatureEngine(spec)
    feats = engine.update(
        engine.slots([str(t["symbol"]) for t in ticks]),
        np.array([t["event_ns"] for t in ticks], np.int64),
        np.array([t["price"] for t in ticks], np.float64),
        np.array([t["quantity"] for t in ticks], np.float64),
        np.array([t["side"] == "buy" for t in ticks]),
    )
    model = load_model(settings.mlflow_uri, settings.model_name, "champion", spec, False)
    expected = np.full(len(ticks), np.nan)
    expected[feats.ready] = model.scorer.score(feats.values[feats.ready])
    return {str(t["trade_id"]): expected[i] for i, t in enumerate(ticks)}, engine


def _assert_scores(signals: list[Signal], want: dict[str, float]) -> int:
    """Every tick has a signal with the uninterrupted run's score; returns the duplicates."""
    by_tick: dict[str, list[Signal]] = {}
    for s in signals:
        by_tick.setdefault(s.trade_id, []).append(s)
    assert by_tick.keys() == want.keys(), "a tick got no signal"
    for trade_id, got in by_tick.items():
        for s in got:  # a tick in flight at a kill may be signalled twice, identically
            if np.isnan(want[trade_id]):
                assert s.score is None, trade_id
            else:
                assert s.score == pytest.approx(want[trade_id], abs=1e-6), trade_id
    return sum(len(v) - 1 for v in by_tick.values())


def _worker(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TICKSERVE_")}
    env.update(
        PYTHONPATH=str(ROOT),
        TICKSERVE_STATE_DIR=str(settings.state_dir),
        TICKSERVE_BROKER_PORT=str(settings.broker_port),
        TICKSERVE_VALKEY_PORT=str(settings.valkey_port),
        TICKSERVE_TICKS_TOPIC=settings.ticks_topic,
        TICKSERVE_SIGNALS_TOPIC=settings.signals_topic,
        TICKSERVE_DLQ_TOPIC=settings.dlq_topic,
        TICKSERVE_GROUP_ID=settings.group_id,
        TICKSERVE_MODEL_NAME=settings.model_name,
        TICKSERVE_HTTP_PORT="0",
        TICKSERVE_SNAPSHOT_INTERVAL_S="0.2",
        TICKSERVE_MAX_BATCH="500",
    )
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "deploy.cli", "serve"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)  # fmt: skip


def _signals(settings: Settings, distinct: int, timeout_s: float = 120) -> list[Signal]:
    """Signals until `distinct` ticks have one (duplicates included)."""

    def done(records: list[Any]) -> bool:
        return len({Signal.decode(r.value).trade_id for r in records}) >= distinct

    records = run(read_topic(settings.bootstrap, settings.signals_topic, 4, distinct, timeout_s,
                             done))  # fmt: skip
    return [Signal.decode(r.value) for r in records]  # type: ignore[attr-defined]


def test_sigkill_and_restart_give_the_uninterrupted_rows(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    settings = fresh(pipeline.settings)
    ticks = _two_symbols(pipeline)
    first, second = int(len(ticks) * 0.4), int(len(ticks) * 0.7)
    log = tmp_path / "worker.log"

    # run A: the first 40%, then more at a steady rate, killed mid-stream
    run(publish(ticks[:first], settings.bootstrap, settings.ticks_topic))
    worker = _worker(settings, log)
    try:
        assert len({s.trade_id for s in _signals(settings, first)}) == first, log.read_text()
        time.sleep(1.0)  # at least one periodic snapshot after the last commit
        sender = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(0.8)"]
        )  # a clock: kill A about 0.8 s into the second phase
        pub = publish(ticks[first:second], settings.bootstrap, settings.ticks_topic,
                      Pacing(rate=4000))  # fmt: skip
        import asyncio

        async def second_phase() -> None:
            task = asyncio.create_task(pub)
            while sender.poll() is None:
                await asyncio.sleep(0.01)
            worker.send_signal(signal.SIGKILL)
            await task

        asyncio.run(second_phase())
        worker.wait(10)
        assert worker.returncode == -signal.SIGKILL
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()

    # run B: restarts from the snapshot, then the rest of the ticks
    worker = _worker(settings, log)
    try:
        run(publish(ticks[second:], settings.bootstrap, settings.ticks_topic))
        signals = _signals(settings, len(ticks), timeout_s=90)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
    text = log.read_text()
    assert '"msg":"partition restored","partition"' in text and '"snapshot":true' in text, text

    # the reference: one uninterrupted pass over the same ticks in the same order
    want, engine = _expected_scores(settings, ticks)
    assert _assert_scores(signals, want) <= 1000  # at most the batches in flight at the kill

    # and the state B saved at shutdown is the uninterrupted run's, bit for bit
    store = SnapshotStore(settings.redis, f"tickserve:snapshots:{settings.group_id}")
    seen = set()
    for partition in range(settings.partitions):
        snap = store.load(settings.ticks_topic, partition)
        if snap is None:
            continue
        for k, symbol in enumerate(snap.symbols):
            seen.add(symbol)
            slot = engine.slot_of[symbol]
            np.testing.assert_array_equal(snap.fstate[k], engine.fstate[slot])
            np.testing.assert_array_equal(snap.istate[k], engine.istate[slot])
            np.testing.assert_array_equal(snap.rings[k], engine.rings[slot])
    store.close()
    assert seen == {"XRP/ETH", "XRPX/ETH"}


def test_a_rebalance_moves_symbols_with_their_state(pipeline: Pipeline, tmp_path: Path) -> None:
    settings = fresh(pipeline.settings)
    ticks = _two_symbols(pipeline, copies=7)[:60_000]  # 8 symbols over 4 partitions
    half = len(ticks) // 2
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    run(publish(ticks[:half], settings.bootstrap, settings.ticks_topic))
    a = _worker(settings, log_a)
    b = None
    try:
        assert len({s.trade_id for s in _signals(settings, half)}) == half, log_a.read_text()
        b = _worker(settings, log_b)  # joins the group: A gives up some partitions
        deadline = time.monotonic() + 90
        while '"snapshot":true' not in log_b.read_text():
            assert time.monotonic() < deadline, log_b.read_text()
            assert b.poll() is None, log_b.read_text()
            time.sleep(0.2)
        run(publish(ticks[half:], settings.bootstrap, settings.ticks_topic))
        signals = _signals(settings, len(ticks), timeout_s=90)
    finally:
        for proc in (a, b):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    want, _ = _expected_scores(settings, ticks)
    assert _assert_scores(signals, want) == 0  # a rebalance commits before it moves anything


def test_a_recreated_topic_is_read_from_its_start_not_from_stale_positions(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    """The ticks topic deleted and recreated under a worker's committed offsets and snapshots."""
    settings = fresh(pipeline.settings, partitions=1)
    ticks = pipeline.ticks[:3000]
    log = tmp_path / "worker.log"
    run(publish(ticks, settings.bootstrap, settings.ticks_topic))
    worker = _worker(settings, log)
    try:
        assert len({s.trade_id for s in _signals(settings, len(ticks))}) == len(ticks)
        time.sleep(1.0)  # a snapshot after the last commit
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)

    run(_recreate(settings.bootstrap, settings.ticks_topic))
    again = [{**t, "trade_id": f"again-{t['trade_id']}"} for t in ticks[:1000]]
    run(publish(again, settings.bootstrap, settings.ticks_topic))
    worker = _worker(settings, log)
    try:
        signals = _signals(settings, len(ticks) + len(again), timeout_s=90)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
    got = {s.trade_id for s in signals if s.trade_id.startswith("again-")}
    assert got == {str(t["trade_id"]) for t in again}, log.read_text()[-3000:]
    text = log.read_text()
    assert "position outside the partition's log" in text, text[-3000:]


async def _recreate(bootstrap: str, topic: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])
    finally:
        await admin.close()
    for _ in range(50):  # the broker may take a moment to let the name go
        try:
            await ensure_topics(bootstrap, [topic], 1)
            return
        except Exception:
            await asyncio.sleep(0.1)
    await ensure_topics(bootstrap, [topic], 1)
