"""Trade file readers: every supported format gives the same raw ticks; bad rows are kept."""

from __future__ import annotations

import gzip
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest

from deploy.settings import Settings
from stream.ingest.feed import (
    SyntheticMarket,
    frame_ticks,
    frame_ticks_by_column,
    frame_ticks_by_row,
    publish,
    read_trades,
    symbol_from_filename,
    trade_chunks,
)
from stream.kafka.clients import ensure_topics, make_producer, start_client
from tests.helpers import DATA, TRADES, read_topic, run, tickserve
from tickserve.errors import DataError


def test_real_parquet_and_freqtrade_json_agree() -> None:
    from_parquet = read_trades(TRADES)
    from_json = read_trades(DATA / "XRP_ETH-trades.json.gz")
    assert len(from_parquet) == 12_477
    assert from_parquet == from_json
    first = from_parquet[0]
    assert first == {
        "symbol": "XRP/ETH",
        "event_ns": 1570752011620 * 1_000_000,
        "price": 0.00141342,
        "quantity": 23.0,
        "side": "sell",
        "trade_id": "13519807",
    }


def test_csv_and_ccxt_json_dicts(tmp_path: Path) -> None:
    frame = pd.read_parquet(TRADES).head(50).assign(symbol="XRP/ETH")
    csv = tmp_path / "trades.csv"
    frame.to_csv(csv, index=False)
    dicts = tmp_path / "trades.json"
    dicts.write_bytes(orjson.dumps(frame.to_dict("records")))
    expected = read_trades(TRADES)[:50]
    assert read_trades(csv) == expected
    assert read_trades(dicts) == expected


def test_binance_agg_trades(tmp_path: Path) -> None:
    rows = [
        {"a": 26129, "p": "0.01633102", "q": "4.70443515", "f": 27781, "l": 27781,
         "T": 1498793709153, "m": True, "M": True},
        {"a": 26130, "p": "0.01633200", "q": "1.0", "f": 27782, "l": 27782,
         "T": 1498793709200, "m": False, "M": True},
    ]  # fmt: skip
    path = tmp_path / "agg.jsonl.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(b"\n".join(orjson.dumps(r) for r in rows))
    ticks = read_trades(path, symbol="LTC/BTC")
    assert [t["side"] for t in ticks] == ["sell", "buy"]  # m=True: the buyer made, taker sold
    assert ticks[0]["price"] == pytest.approx(0.01633102)
    assert ticks[0]["event_ns"] == 1498793709153 * 1_000_000
    assert ticks[1]["trade_id"] == "26130"


def test_bad_rows_are_kept_for_the_dead_letter_topic(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "timestamp": [1, 2, None],
            "symbol": ["A", "A", "A"],
            "side": ["buy", "hold", "sell"],
            "price": [1.0, float("nan"), 1.0],
            "amount": [1.0, 1.0, -1.0],
            "id": ["1", "2", "3"],
        }
    )
    path = tmp_path / "bad.csv"
    frame.to_csv(path, index=False)
    ticks = read_trades(path)
    assert len(ticks) == 3
    assert ticks[1]["price"] is None and ticks[1]["side"] == "hold"
    assert ticks[2]["event_ns"] is None and ticks[2]["quantity"] == -1.0


def test_clear_errors() -> None:
    with pytest.raises(DataError, match="not found"):
        read_trades(Path("/nonexistent/trades.parquet"))
    with pytest.raises(DataError, match="unknown trade file format"):
        read_trades(TRADES.with_name("README.md").parent.parent / "README.md")


def test_missing_symbol_needs_the_flag(tmp_path: Path) -> None:
    path = tmp_path / "trades.parquet"
    pd.read_parquet(TRADES).head(5).to_parquet(path)
    with pytest.raises(DataError, match="--symbol"):
        read_trades(path)
    assert read_trades(path, symbol="X/Y")[0]["symbol"] == "X/Y"


def test_symbol_from_freqtrade_file_name() -> None:
    assert symbol_from_filename(Path("ETH_BTC-trades.json.gz")) == "ETH/BTC"
    assert symbol_from_filename(Path("ticks.csv")) is None


def test_synthetic_market_is_seeded() -> None:
    a = list(SyntheticMarket(symbols=3, seed=1).ticks(100))
    b = list(SyntheticMarket(symbols=3, seed=1).ticks(100))
    assert a == b
    assert {t["symbol"] for t in a} == {"SYN000/USD", "SYN001/USD", "SYN002/USD"}
    assert all(t["price"] > 0 and t["quantity"] >= 0 for t in a)


TRADE_FILES = Path(__file__).resolve().parent / "data" / "trades"
KRAKEN = TRADE_FILES / "XBTUSDT.csv"
TARDIS = TRADE_FILES / "binance-trades-BTCUSDT.csv"


def _gzipped(path: Path, tmp_path: Path) -> Path:
    out = tmp_path / (path.name + ".gz")
    out.write_bytes(gzip.compress(path.read_bytes()))
    return out


def test_kraken_headerless_csv_plain_and_gz(tmp_path: Path) -> None:
    ticks = read_trades(KRAKEN)  # the symbol from Kraken's file name: XBTUSDT -> BTC/USDT
    assert read_trades(_gzipped(KRAKEN, tmp_path)) == ticks
    assert len(ticks) == 8
    assert {t["symbol"] for t in ticks} == {"BTC/USDT"}
    assert ticks[1]["event_ns"] == 1696118400_500000_000  # seconds with a fraction
    assert [t["trade_id"] for t in ticks] == [str(i) for i in range(1, 9)]  # line numbers
    # the tick rule: first a buy; down -> sell; unchanged -> as before; up -> buy
    assert [t["side"] for t in ticks] == ["buy", "buy", "sell", "sell", "buy", "buy", "sell", "buy"]
    assert (ticks[6]["price"], ticks[6]["quantity"]) == (26959.9, 1.25)
    assert read_trades(KRAKEN, symbol="XBT/USDT")[0]["symbol"] == "XBT/USDT"  # --symbol wins
    unnamed = tmp_path / "trades.csv"
    unnamed.write_bytes(KRAKEN.read_bytes())
    with pytest.raises(DataError, match="Kraken trades CSV has no symbol; pass --symbol"):
        read_trades(unnamed)


def test_tardis_trades_csv_plain_and_gz(tmp_path: Path) -> None:
    ticks = read_trades(TARDIS)
    assert read_trades(_gzipped(TARDIS, tmp_path)) == ticks
    assert len(ticks) == 6
    assert ticks[0] == {
        "symbol": "BTCUSDT",  # as the file names it
        "event_ns": 1696118400123456 * 1000,  # microseconds kept
        "price": 26962.10,
        "quantity": 0.00185,
        "side": "buy",
        "trade_id": "3218940021",
    }
    assert ticks[3]["side"] == "unknown"  # kept: the worker dead-letters it (reason side)
    assert ticks[4]["symbol"] == "ETHUSDT"


def test_chunks_equal_the_whole_file(tmp_path: Path) -> None:
    whole = read_trades(TRADES)
    for path in (TRADES, DATA / "XRP_ETH-trades.json.gz"):
        chunks = list(trade_chunks(path, chunk_rows=1000))
        assert len(chunks) == 13 and max(len(c) for c in chunks) == 1000
        assert [t for c in chunks for t in c] == whole
    csv = tmp_path / "XRP_ETH-trades.csv.gz"
    pd.read_parquet(TRADES).to_csv(csv, index=False)
    assert [t for c in trade_chunks(csv, chunk_rows=1000) for t in c] == whole
    kraken = tmp_path / "XBTUSDT.csv"
    kraken.write_text(KRAKEN.read_text() * 3000)  # 24,000 rows: several CSV blocks
    ticks = read_trades(kraken)
    assert [t["trade_id"] for t in ticks] == [str(i) for i in range(1, 24_001)]
    assert ticks[8]["side"] == "sell"  # 26963.0 -> 26962.1 across the repeat


def test_import_and_features_read_the_new_formats(tmp_path: Path) -> None:
    from stream.ingest.backfill import tick_tables

    for path, symbol in ((KRAKEN, None), (TARDIS, None)):
        rows, valid, skipped = 0, 0, Counter[str]()
        for n, table, bad in tick_tables(path, symbol, 2**62, 0):
            rows, valid = rows + n, valid + table.num_rows
            skipped.update(bad)
            assert table.column("event_ns").to_pylist()[0] == read_trades(path)[0]["event_ns"]
        expected_bad = {"side": 1} if path == TARDIS else {}
        assert (rows, valid, dict(skipped)) == (
            len(read_trades(path)),
            rows - sum(expected_bad.values()),
            expected_bad,
        )


def test_features_command_streams_chunks_equal_to_the_whole(tmp_path: Path) -> None:
    from features.offline import feature_chunks, features_frame
    from features.spec import FeatureSpec

    spec = FeatureSpec(bar_ns=60_000_000_000)
    frame = pd.read_parquet(TRADES)
    ticks = pd.DataFrame(
        {
            "symbol": "XRP/ETH",
            "event_ns": frame["timestamp"].to_numpy() * 1_000_000,
            "price": frame["price"],
            "quantity": frame["amount"],
            "is_buy": frame["side"] == "buy",
        }
    )
    whole = features_frame(ticks, spec)
    parts = [ticks.iloc[i : i + 1000] for i in range(0, len(ticks), 1000)]
    chunked = pd.concat(list(feature_chunks(parts, spec)), ignore_index=True)
    pd.testing.assert_frame_equal(chunked, whole)


def test_features_cli_reads_a_tardis_file_chunk_by_chunk(tmp_path: Path) -> None:
    out = tmp_path / "features.parquet"
    done = tickserve("features", "--input", str(_gzipped(TARDIS, tmp_path)), "--output", str(out),
                     env={"TICKSERVE_STATE_DIR": str(tmp_path)}, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "features: 5 rows (0 ready)" in done.stdout
    assert "skipped 1 invalid {'side': 1}" in done.stdout
    table = pd.read_parquet(out)
    assert table["trade_id"].tolist() == ["3218940021", "3218940022", "3218940023",
                                          "1190020011", "3218940025"]  # fmt: skip
    assert table["event_ns"].iloc[0] == 1696118400123456 * 1000
    assert {"return_1", "ready", "late"} <= set(table.columns)


def _messy_frames() -> list[pd.DataFrame]:
    """Frames with bad values in every column, in the dtypes readers give (numpy, Int64)."""
    return [
        pd.DataFrame(
            {
                "timestamp": [1, 2, None, 4.5, np.inf, 6],
                "symbol": ["A", None, "", "B", np.nan, "C"],
                "side": ["buy", "hold", None, np.nan, "sell", 3],
                "price": [1.0, np.nan, "x", None, -np.inf, 2],
                "amount": [1.0, 1.0, -1.0, np.nan, 2.0, 3.0],
                "id": [1.0, np.nan, 3.5, 4.0, 5.0, 6.0],
            }
        ),
        pd.DataFrame(
            {
                "timestamp": np.array([1, 2, 3]),
                "side": ["buy", "sell", "buy"],
                "price": np.array([1.0, np.nan, np.inf]),
                "amount": np.array([1, 2, 3]),
                "id": np.array([7, 8, 9]),
            }
        ),
        pd.DataFrame(
            {
                "timestamp": pd.array([1, None, 3], dtype="Int64"),
                "event_ns": pd.array([None, 5, None], dtype="Int64"),
                "side": ["buy", "sell", "buy"],
                "price": np.array([1.0, 2.0, 3.0], dtype=np.float32),
                "amount": [True, False, True],
                "id": ["a", None, "c"],
                "symbol": ["S", "S", None],
            }
        ),
        # ms * 1e6 past int64: Python ints, as the row-by-row path gives
        pd.DataFrame(
            {"timestamp": [2**62, 1], "side": ["buy", "sell"], "price": [1.0, 2.0], "amount": 1.0}
        ),
        pd.DataFrame({"timestamp": [], "side": [], "price": [], "amount": []}),
        pd.read_parquet(TRADES).head(500),
    ]


def test_column_wise_ticks_equal_the_row_by_row_reference_bad_rows_included() -> None:
    for frame in _messy_frames():
        for symbol in (None, "X/Y"):
            expected = frame_ticks_by_row(frame, symbol)
            assert frame_ticks_by_column(frame, symbol) == expected
            assert frame_ticks(frame, symbol) == expected
    bad = frame_ticks_by_column(_messy_frames()[0], "X/Y")
    assert bad[1] == {
        "symbol": "X/Y",
        "event_ns": 2_000_000,
        "price": None,
        "quantity": 1.0,
        "side": "hold",
        "trade_id": None,
    }
    assert bad[2] == {
        "symbol": "X/Y",
        "event_ns": None,
        "price": "x",
        "quantity": -1.0,
        "side": None,
        "trade_id": "3.5",
    }
    assert (bad[3]["event_ns"], bad[3]["trade_id"]) == (4.5, "4")  # passed on to be refused
    assert bad[4]["event_ns"] is None and bad[4]["price"] is None


async def _send_one_each(bootstrap: str, topic: str, keys: list[bytes]) -> None:
    producer = make_producer(bootstrap)
    await start_client(producer, bootstrap)
    try:
        for key in keys:
            await (await producer.send(topic, b"{}", key=key))
    finally:
        await producer.stop()


@pytest.mark.services
def test_a_symbols_ticks_land_where_producer_send_puts_its_key_in_order(topics: Settings) -> None:
    bootstrap, partitions = topics.bootstrap, topics.partitions
    batched, reference = topics.ticks_topic, topics.signals_topic
    run(ensure_topics(bootstrap, [batched, reference], partitions))
    keys = [f"S{i:02d}/USD".encode() for i in range(40)]
    ticks: list[dict[str, object]] = [
        {
            "symbol": keys[i % len(keys)].decode(),
            "event_ns": i,
            "price": 1.0,
            "quantity": 1.0,
            "side": "buy",
            "trade_id": str(i),
        }
        for i in range(3000)
    ]
    ticks.insert(1500, {"raw": [1, 2]})  # no key: any partition
    assert run(publish(ticks, bootstrap, batched)) == len(ticks)

    run(_send_one_each(bootstrap, reference, keys))
    sent = run(read_topic(bootstrap, reference, partitions, len(keys)))
    expected = {record.key: record.partition for record in sent}  # type: ignore[attr-defined]
    assert len(expected) == len(keys) and len(set(expected.values())) > 1
    records = run(read_topic(bootstrap, batched, partitions, len(ticks)))
    assert len(records) == len(ticks)  # type: ignore[arg-type]
    ids: dict[bytes, list[int]] = defaultdict(list)
    for record in records:  # type: ignore[attr-defined]
        if record.key is None:
            assert orjson.loads(record.value) == [1, 2]
            continue
        assert record.partition == expected[record.key]
        ids[record.key].append(int(orjson.loads(record.value)["trade_id"]))
    assert all(got == sorted(got) for got in ids.values())
    assert sum(len(got) for got in ids.values()) == 3000


def test_column_wise_ticks_that_disagree_give_way_to_the_reference(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import stream.ingest.feed as feed

    frame = _messy_frames()[0]
    expected = frame_ticks_by_row(frame, "X/Y")
    wrong = [{**tick, "side": "buy"} for tick in expected]  # differs at the rows with gaps
    monkeypatch.setattr(feed, "frame_ticks_by_column", lambda frame, symbol: wrong)
    assert frame_ticks(frame, "X/Y") == expected
    assert "differ from the row-by-row reference" in caplog.text
