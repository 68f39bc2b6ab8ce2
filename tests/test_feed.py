"""Trade file readers: every supported format gives the same raw ticks; bad rows are kept."""

from __future__ import annotations

import gzip
from pathlib import Path

import orjson
import pandas as pd
import pytest

from stream.ingest.feed import SyntheticMarket, read_trades, symbol_from_filename
from tests.helpers import DATA, TRADES
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
