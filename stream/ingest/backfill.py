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
from stream.ingest.feed import (
    NS_PER_MS,
    is_columnar,
    symbol_from_filename,
    trade_chunks,
    trade_frames,
)
from tickserve.errors import DataError, InvalidTick
from tickserve.progress import progress_bar

logger = logging.getLogger(__name__)


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
    if "event_ns" in frame.columns:  # Kraken and tardis files: finer than ccxt's ms
        ts_ok = frame["event_ns"].notna().to_numpy(bool)
        event_ns = frame["event_ns"].fillna(0).to_numpy(np.int64)
    elif ts.dtype.kind == "M":  # datetimes are not ccxt's integer ms: the row path rejects them
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


def tick_tables(
    path: Path, symbol: str | None, now_ns: int, max_future_ns: int
) -> Iterator[tuple[int, pa.Table, Counter[str]]]:
    """A trade file as validated tick tables, chunk by chunk: (rows read, valid ticks, skipped).

    Columnar files (Parquet, CSV of any layout, Feather) are validated vectorized
    (`validate_frame`); JSON files row by row (`validate_rows`). Both apply the same
    rules (a test holds them equal). Memory stays bounded by one chunk.

    Raises:
        DataError: The file is missing, unreadable or of an unknown format.
    """
    if not path.exists():
        raise DataError(f"trade file not found: {path}")
    if is_columnar(path):
        default = symbol or symbol_from_filename(path)
        for frame in trade_frames(path, default):
            if "symbol" not in frame.columns:
                raise DataError(f"{path}: rows have no symbol; pass --symbol")
            table, skipped = validate_frame(frame, default, now_ns, max_future_ns)
            yield len(frame), table, skipped
        return
    try:
        for rows in trade_chunks(path, symbol):
            table, skipped = validate_rows(rows, now_ns, max_future_ns)
            yield len(rows), table, skipped
    except ValueError as exc:  # orjson.JSONDecodeError
        raise DataError(f"{path}: not a readable trade file: {exc}") from exc


def import_file(
    archive: ClickHouseArchive,
    path: Path,
    symbol: str | None = None,
    max_future_ns: int = 5_000_000_000,
    progress: bool = False,
) -> ImportReport:
    """Read a trade file chunk by chunk, validate every row, insert the valid ones in bulk.

    One INSERT per chunk (`tick_tables`), so memory stays flat whatever the file's size.
    """
    report = ImportReport()
    now_ns = time.time_ns()
    with progress_bar(f"import {path.name}", unit=" rows", enabled=progress) as bar:
        for rows, table, skipped in tick_tables(path, symbol, now_ns, max_future_ns):
            archive.insert_tick_table(table)
            report.rows += rows
            report.inserted += table.num_rows
            report.skipped.update(skipped)
            bar.update(rows)
    logger.info(
        "import done", extra={"file": str(path), "rows": report.rows, "inserted": report.inserted}
    )
    return report
