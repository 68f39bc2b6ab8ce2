"""The archive: bulk import, ClickHouse bars equal to the Numba bars, kill -9 and restart."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from deploy.settings import Settings
from features.engine import FeatureEngine
from features.kernels import F_BUY, F_CLOSE, F_HIGH, F_LOW, F_OPEN, F_VOLUME, I_NTRADES
from features.spec import FeatureSpec
from stream.contracts.signal import encode_signals
from stream.ingest.archive import ClickHouseArchive
from stream.ingest.backfill import import_file, validate_frame, validate_rows
from stream.ingest.feed import Pacing, SyntheticMarket, publish, read_trades
from stream.kafka.clients import ensure_topics, make_producer, start_client
from tests.helpers import ROOT, TRADES, error_lines, run, tickserve, unique

NOW = time.time_ns()
FUTURE = NOW + 3600 * 10**9

# (column overrides, reason the tick contract gives)
BAD_ROWS = [
    ({"price": -1.0}, "price"),
    ({"price": 0.0}, "price"),
    ({"price": float("nan")}, "schema"),
    ({"amount": -3.0}, "quantity"),
    ({"amount": float("inf")}, "schema"),
    ({"side": "hold"}, "side"),
    ({"side": None}, "side"),
    ({"id": None}, "schema"),
    ({"timestamp": FUTURE // 1_000_000}, "future"),
]


def _frame_with_bad_rows() -> pd.DataFrame:
    frame = pd.read_parquet(TRADES).head(2000).reset_index(drop=True)
    frame["timestamp"] = frame["timestamp"].astype("float64")  # NaN-capable, as in files
    frame["price"] = frame["price"].astype(object)
    for k, (override, _) in enumerate(BAD_ROWS):
        for column, value in override.items():
            frame.at[100 + 50 * k, column] = value
    return frame


def test_vectorized_import_applies_the_tick_contract_row_for_row(tmp_path: Path) -> None:
    frame = _frame_with_bad_rows()
    frame.to_parquet(tmp_path / "XRP_ETH-trades.parquet")
    fast, fast_skipped = validate_frame(frame, "XRP/ETH", NOW, 5_000_000_000)
    rows = read_trades(tmp_path / "XRP_ETH-trades.parquet")
    slow, slow_skipped = validate_rows(rows, NOW, 5_000_000_000)
    expected: dict[str, int] = {}
    for _, reason in BAD_ROWS:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(slow_skipped) == expected
    assert dict(fast_skipped) == expected
    assert fast.num_rows == slow.num_rows == len(frame) - len(BAD_ROWS)
    assert fast.to_pydict() == slow.to_pydict()


def test_import_cli_reports_skipped_rows_and_deduplicates(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    trades = data / "trades.csv"
    frame = _frame_with_bad_rows()
    frame.to_csv(trades, index=False)
    env = {"TICKSERVE_STATE_DIR": str(tmp_path / "state")}
    done = tickserve("import", "--input", str(trades), "--symbol", "XRP/ETH", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    valid = len(frame) - len(BAD_ROWS)
    expected = f"read {len(frame)} rows, inserted {valid}, skipped {len(BAD_ROWS)} invalid"
    assert expected in done.stdout
    assert "future=1" in done.stdout and "price=2" in done.stdout
    # the same trades again, as ccxt JSON: nothing is counted twice
    as_json = data / "trades.json"
    as_json.write_text(json.dumps(frame.head(100).to_dict("records"), default=str))
    done = tickserve("import", "--input", str(as_json), "--symbol", "XRP/ETH", env=env,
                     cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"; {valid} ticks in the archive" in done.stdout


def test_import_of_an_unknown_format_is_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "trades.xlsx"
    bad.write_bytes(b"PK")
    broken = tmp_path / "trades.json"
    broken.write_text("[{]")
    done = tickserve("import", "--input", str(broken), env={"TICKSERVE_STATE_DIR": str(tmp_path)},
                     cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2
    assert f"tickserve import: error: {broken}: not a readable trade file" in done.stderr
    done = tickserve("import", "--input", str(bad), env={"TICKSERVE_STATE_DIR": str(tmp_path)},
                     cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2
    expected = f"tickserve import: error: {bad}: unknown trade file format '.xlsx'"
    assert error_lines(done) == [expected]
    missing = tmp_path / "x.parquet"
    pd.DataFrame({"timestamp": [1], "price": [1.0]}).to_parquet(missing)
    done = tickserve("import", "--input", str(missing), "--symbol", "A",
                     env={"TICKSERVE_STATE_DIR": str(tmp_path)}, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2
    assert "missing columns ['amount', 'side']" in done.stderr


def _numba_bars(ticks: pd.DataFrame, spec: FeatureSpec) -> pd.DataFrame:
    """Feed the kernels bar by bar and read each open bar's state at its end."""
    engine = FeatureEngine(spec, max_symbols=1)
    slots = engine.slots(["s"] * len(ticks))
    ns = ticks["event_ns"].to_numpy(np.int64)
    bars = ns // spec.bar_ns
    bounds = np.flatnonzero(np.diff(bars)) + 1
    rows = []
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(ticks)], strict=True):
        engine.update(slots[lo:hi], ns[lo:hi], ticks["price"].to_numpy()[lo:hi],
                      ticks["quantity"].to_numpy()[lo:hi],
                      ticks["is_buy"].to_numpy(bool)[lo:hi])  # fmt: skip
        f = engine.fstate[0]
        rows.append((bars[lo], f[F_OPEN], f[F_HIGH], f[F_LOW], f[F_CLOSE], f[F_VOLUME],
                     f[F_BUY], engine.istate[0, I_NTRADES]))  # fmt: skip
    return pd.DataFrame(rows, columns=["bar", "open", "high", "low", "close", "volume",
                                       "buy_volume", "trades"])  # fmt: skip


@pytest.mark.services
@pytest.mark.parametrize("bar_seconds", [60, 7])
def test_bars_from_clickhouse_equal_the_numba_bars(
    stack_settings: Settings, bar_seconds: int
) -> None:
    symbol = unique("BARS")
    archive = ClickHouseArchive.open(stack_settings.clickhouse)
    report = import_file(archive, TRADES, symbol=None, max_future_ns=0)
    assert report.inserted == len(pd.read_parquet(TRADES))
    # the real trades again under a symbol of this test's own
    frame = pd.read_parquet(TRADES).assign(symbol=symbol)
    table, _ = validate_frame(frame, None, NOW, 0)
    archive.insert_tick_table(table)
    spec = FeatureSpec(bar_ns=bar_seconds * 1_000_000_000)
    sql = archive.read_bars(spec.bar_ns, [symbol])
    numba = _numba_bars(archive.read_ticks([symbol]), spec)
    assert len(sql) == len(numba) > 500
    assert (sql["symbol"] == symbol).all()
    np.testing.assert_array_equal(sql["bar"].to_numpy(), numba["bar"].to_numpy())
    for column in ("open", "high", "low", "close", "trades"):
        np.testing.assert_array_equal(sql[column].to_numpy(), numba[column].to_numpy(), column)
    for column in ("volume", "buy_volume"):  # summation order may differ in the last bit
        np.testing.assert_allclose(sql[column], numba[column], rtol=1e-12, err_msg=column)


async def _send(settings: Settings, ticks: list[dict[str, object]], n_signals: int,
                rate: float) -> None:  # fmt: skip
    producer = make_producer(settings.bootstrap)
    await start_client(producer, settings.bootstrap)

    async def signals() -> None:
        for i in range(n_signals):
            now = time.time_ns()
            (value,) = encode_signals([f"SYN{i % 5:03d}/USD"], [f"syn-{i}"], [now], [now], [0],
                                      [i], now, "m", "1", [0.6], 0.5)  # fmt: skip
            await producer.send(settings.signals_topic, value, key=b"k")
            if i % 500 == 0:
                await asyncio.sleep(500 / rate)
        await producer.flush()

    try:
        await asyncio.gather(
            publish(ticks, settings.bootstrap, settings.ticks_topic, Pacing(rate=rate)), signals()
        )
    finally:
        await producer.stop()


async def _committed(settings: Settings) -> int:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap,
        group_id=settings.archive_group_id,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        total = 0
        for topic in (settings.ticks_topic, settings.signals_topic):
            for p in range(settings.partitions):
                total += (await consumer.committed(TopicPartition(topic, p))) or 0
        return total
    finally:
        await consumer.stop()


@pytest.mark.services
def test_archiver_killed_mid_stream_loses_and_doubles_nothing(
    topics: Settings, tmp_path: Path
) -> None:
    settings = topics
    n_ticks, n_signals = 40_000, 20_000
    run(ensure_topics(settings.bootstrap, [settings.ticks_topic, settings.signals_topic],
                      settings.partitions))  # fmt: skip
    env = {
        "TICKSERVE_STATE_DIR": str(tmp_path),  # its own chdb path: one per process
        "TICKSERVE_BROKER_PORT": str(settings.broker_port),
        "TICKSERVE_TICKS_TOPIC": settings.ticks_topic,
        "TICKSERVE_SIGNALS_TOPIC": settings.signals_topic,
        "TICKSERVE_ARCHIVE_GROUP_ID": settings.archive_group_id,
    }
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TICKSERVE_", "MLFLOW_"))}
    ticks = list(SyntheticMarket(symbols=5, seed=11).ticks(n_ticks))
    first_part = 2000
    run(publish(ticks[:first_part], settings.bootstrap, settings.ticks_topic))
    first = subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", "archive"], cwd=tmp_path,
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    sender = threading.Thread(
        target=run, args=(_send(settings, ticks[first_part:], n_signals, 8000.0),)
    )
    try:
        deadline = time.monotonic() + 60
        while run(_committed(settings)) == 0:  # joined the group, archiving
            assert time.monotonic() < deadline, "the archiver never committed"
            assert first.poll() is None, "the archiver exited"
            time.sleep(0.2)
        sender.start()
        while run(_committed(settings)) <= first_part:  # archiving the live stream
            assert time.monotonic() < deadline, "the archiver stopped committing"
            time.sleep(0.1)
        assert sender.is_alive(), "the stream ended before the kill: not mid-stream"
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
        if sender.is_alive() or sender.ident is not None:
            sender.join(120)
    committed_at_kill = run(_committed(settings))
    assert 0 < committed_at_kill < n_ticks + n_signals

    done = tickserve("archive", "--idle-exit", "3", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    counts = re.search(r"(\d+) ticks and (\d+) signals in the archive", done.stdout)
    assert counts is not None, done.stdout
    assert (int(counts[1]), int(counts[2])) == (n_ticks, n_signals)
    assert run(_committed(settings)) == n_ticks + n_signals
