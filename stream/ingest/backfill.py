"""Backfills: load historical trade files straight into the archive, validated, in bulk."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from stream.contracts.tick import SIDES, validate
from stream.ingest.archive import TICK_COLUMNS, ClickHouseArchive
from stream.ingest.feed import NS_PER_MS, read_trades, symbol_from_filename
from tickserve.errors import DataError, InvalidTick
from tickserve.progress import progress_bar

logger = logging.getLogger(__name__)

COLUMNAR = (".parquet", ".csv", ".feather")
CHUNK_ROWS = 1_000_000


@dataclass(slots=True)
class ImportReport:
    """What an import read, inserted and skipped (skipped rows counted per reason)."""

    rows: int = 0
    inserted: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        """One line for the CLI."""
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
        skipped = sum(self.skipped.values())
        return f"read {self.rows} rows, inserted {self.inserted}, skipped {skipped} invalid" + (
            f" ({reasons})" if reasons else ""
        )


def _tick_table(
    symbol: Any, event_ns: Any, trade_id: Any, price: Any, qty: Any, is_buy: Any, recv_ns: Any
) -> pa.Table:
    arrays = [
        pa.array(symbol, pa.string()),
        pa.array(event_ns, pa.int64()),
        pa.array(trade_id, pa.string()),
        pa.array(price, pa.float64()),
        pa.array(qty, pa.float64()),
        pa.array(is_buy, pa.uint8()),
        pa.array(recv_ns, pa.int64()),
    ]
    return pa.Table.from_arrays(arrays, names=list(TICK_COLUMNS))


def validate_rows(
    rows: list[dict[str, Any]], now_ns: int, max_future_ns: int
) -> tuple[pa.Table, Counter[str]]:
    """Row by row through `stream.contracts.tick.validate` (any format `read_trades` reads)."""
    ticks = []
    skipped: Counter[str] = Counter()
    for row in rows:
        try:
            doc = row.get("raw", {**row, "recv_ns": now_ns})
            ticks.append(validate(doc, now_ns, max_future_ns))
        except InvalidTick as exc:
            skipped[exc.reason] += 1
    table = _tick_table(
        [t.symbol for t in ticks],
        [t.event_ns for t in ticks],
        [t.trade_id for t in ticks],
        [t.price for t in ticks],
        [t.quantity for t in ticks],
        [int(SIDES[t.side]) for t in ticks],
        [t.recv_ns for t in ticks],
    )
    return table, skipped


def _numbers(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(float values, schema-ok mask): a missing or non-finite number fails the schema."""
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(np.float64, na_value=np.nan)
    if values.dtype.kind in "iuf":
        return numbers, np.isfinite(numbers)
    is_number = values.map(lambda v: type(v) in (int, float)).to_numpy(bool)
    return numbers, is_number & np.isfinite(numbers)


def validate_frame(
    frame: pd.DataFrame, symbol: str | None, now_ns: int, max_future_ns: int
) -> tuple[pa.Table, Counter[str]]:
    """The same checks as `stream.contracts.tick.validate`, vectorized over a ccxt trade frame.

    The first failing check names the reason, in `validate`'s order: schema (symbol,
    timestamp), price, quantity, side, schema (trade id), future.
    """
    n = len(frame)
    if "symbol" in frame.columns:
        symbols = frame["symbol"].where(frame["symbol"].notna(), symbol)
    else:
        symbols = pd.Series([symbol] * n, index=frame.index, dtype=object)
    if pd.api.types.is_string_dtype(symbols.dropna()):
        sym_ok = (symbols.notna() & (symbols != "")).to_numpy(bool)
    else:
        sym_ok = symbols.map(lambda s: isinstance(s, str) and s != "").to_numpy(bool)

    ts = frame["timestamp"]
    if ts.dtype.kind == "M":  # datetimes are not ccxt's integer ms: the row path rejects them
        ts_ok = np.zeros(n, bool)
        event_ns = np.zeros(n, np.int64)
    elif ts.dtype.kind in "iu":
        ts_ok = np.ones(n, bool)
        event_ns = ts.to_numpy(np.int64) * NS_PER_MS
    else:
        raw = pd.to_numeric(ts, errors="coerce").to_numpy(np.float64, na_value=np.nan)
        ts_ok = np.isfinite(raw) & (raw == np.round(raw))
        event_ns = np.where(ts_ok, raw, 0).astype(np.int64) * NS_PER_MS
    price, price_ok = _numbers(frame["price"])
    qty, qty_ok = _numbers(frame["amount"])
    side = frame["side"]
    side_ok = side.isin(list(SIDES)).to_numpy(bool)
    ids = frame["id"] if "id" in frame.columns else pd.Series([None] * n, index=frame.index)
    id_ok = ids.notna().to_numpy(bool)

    checks = [
        ("schema", sym_ok & ts_ok & price_ok),
        ("price", price > 0),
        ("schema", qty_ok),
        ("quantity", qty >= 0),
        ("side", side_ok),
        ("schema", id_ok),
        ("future", event_ns <= now_ns + max_future_ns),
    ]
    ok = np.ones(n, bool)
    skipped: Counter[str] = Counter()
    for reason, passed in checks:
        failed = ok & ~passed
        if failed.any():
            skipped[reason] += int(failed.sum())
        ok &= passed
    trade_ids = ids[ok]
    if trade_ids.dtype.kind == "f" and (trade_ids == np.round(trade_ids)).all():
        trade_ids = trade_ids.astype(np.int64)  # CSV ids next to a gap are read as floats
    table = _tick_table(
        symbols[ok].astype(str).to_numpy(),
        event_ns[ok],
        trade_ids.astype(str).to_numpy(),
        price[ok],
        qty[ok],
        side[ok].eq("buy").to_numpy(np.uint8),
        np.full(int(ok.sum()), now_ns, np.int64),
    )
    return table, skipped


def _frames(path: Path) -> Iterator[pd.DataFrame]:
    """A columnar trade file in chunks (Parquet streamed, CSV/Feather at once)."""
    suffix = path.suffix
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=CHUNK_ROWS):
            yield batch.to_pandas()
    elif suffix == ".csv":
        yield pd.read_csv(path)
    else:
        yield pd.read_feather(path)


def import_file(
    archive: ClickHouseArchive,
    path: Path,
    symbol: str | None = None,
    max_future_ns: int = 5_000_000_000,
    progress: bool = False,
) -> ImportReport:
    """Read a trade file, validate every row, insert the valid ones in bulk.

    Columnar ccxt files (Parquet, CSV, Feather) are validated vectorized, chunk by
    chunk; every other format `stream.ingest.feed.read_trades` knows goes row by row through
    `stream.contracts.tick.validate`. Both apply the same rules (a test holds them equal).
    """
    if not path.exists():
        raise DataError(f"trade file not found: {path}")
    report = ImportReport()
    now_ns = time.time_ns()
    if path.suffix in COLUMNAR:
        default = symbol or symbol_from_filename(path)
        with progress_bar(f"import {path.name}", unit=" rows", enabled=progress) as bar:
            for frame in _frames(path):
                missing = {"timestamp", "price", "amount", "side"} - set(frame.columns)
                if missing:
                    raise DataError(
                        f"{path}: not a ccxt trade file, missing columns {sorted(missing)}"
                    )
                if "symbol" not in frame.columns and default is None:
                    raise DataError(f"{path}: rows have no symbol; pass --symbol")
                table, skipped = validate_frame(frame, default, now_ns, max_future_ns)
                archive.insert_tick_table(table)
                report.rows += len(frame)
                report.inserted += table.num_rows
                report.skipped.update(skipped)
                bar.update(len(frame))
    else:
        try:
            rows = read_trades(path, symbol)
        except ValueError as exc:  # orjson.JSONDecodeError
            raise DataError(f"{path}: not a readable trade file: {exc}") from exc
        table, skipped = validate_rows(rows, now_ns, max_future_ns)
        archive.insert_tick_table(table)
        report.rows, report.inserted, report.skipped = len(rows), table.num_rows, skipped
    logger.info(
        "import done", extra={"file": str(path), "rows": report.rows, "inserted": report.inserted}
    )
    return report
