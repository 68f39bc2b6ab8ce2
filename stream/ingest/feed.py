"""Feed adapters: trade files of every supported layout, read in chunks; a synthetic market."""

from __future__ import annotations

import asyncio
import gzip
import logging
import math
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
from aiokafka.errors import KafkaError
from opentelemetry.trace import Span, SpanKind

from stream.kafka.clients import make_producer, start_client
from stream.kafka.partition_batches import PartitionBatches
from stream.kafka.security import PLAINTEXT, KafkaSecurity
from tickserve.errors import BrokerError, DataError
from tickserve.tracing import TRACEPARENT, TraceBudget, Tracing, messaging, traceparent

logger = logging.getLogger(__name__)

NS_PER_MS = 1_000_000
CHUNK_ROWS = 50_000
PROBE_ROWS = 8  # rows with gaps `frame_ticks` holds against the row-by-row reference
CSV_BLOCK_BYTES = 4 << 20
TARDIS_COLUMNS = (
    "exchange",
    "symbol",
    "timestamp",
    "local_timestamp",
    "id",
    "side",
    "price",
    "amount",
)
# Kraken pair names end in one of these (longest first); XBT is Kraken's name for bitcoin.
KRAKEN_QUOTES = (
    "USDT",
    "USDC",
    "USD",
    "EUR",
    "GBP",
    "CAD",
    "JPY",
    "CHF",
    "AUD",
    "XBT",
    "ETH",
    "DAI",
)
_KRAKEN_ASSETS = {"XBT": "BTC", "XDG": "DOGE"}
# freqtrade's list rows: [timestamp, id, type, side, price, amount, cost]
_FREQTRADE_ROW = ("timestamp", "id", "type", "side", "price", "amount", "cost")


def _clean(value: Any) -> Any:
    """JSON-safe scalar: numpy to Python, NaN/NaT/None to None; other values unchanged."""
    if value is None or value is pd.NaT or value is pd.NA:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _timestamp_ns(value: Any) -> Any:
    """Ccxt timestamps are integer ms; pass anything else through for the worker to reject."""
    value = _clean(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if type(value) is int:
        return value * NS_PER_MS
    return value


def symbol_from_filename(path: Path) -> str | None:
    """Freqtrade names files BASE_QUOTE-trades.*: `XRP_ETH-trades.parquet` -> `XRP/ETH`."""
    match = re.match(r"^([A-Z0-9]+)_([A-Z0-9]+)-trades", path.name)
    return f"{match.group(1)}/{match.group(2)}" if match else None


def _from_ccxt(row: dict[str, Any], symbol: str | None) -> dict[str, Any]:
    trade_id = _clean(row.get("id"))
    if isinstance(trade_id, float) and trade_id.is_integer():  # CSV ids next to a gap
        trade_id = int(trade_id)
    event_ns = _clean(row.get("event_ns"))  # finer than ccxt's ms, where the file has it
    return {
        "symbol": _clean(row.get("symbol")) or symbol,
        "event_ns": event_ns if event_ns is not None else _timestamp_ns(row.get("timestamp")),
        "price": _clean(row.get("price")),
        "quantity": _clean(row.get("amount")),
        "side": _clean(row.get("side")),
        "trade_id": str(trade_id) if trade_id is not None else None,
    }


def _from_agg_trade(row: dict[str, Any], symbol: str | None) -> dict[str, Any]:
    """Binance aggTrade: p, q are decimal strings; m=True means the buyer was the maker."""

    def number(text: Any) -> Any:
        try:
            return float(text)
        except (TypeError, ValueError):
            return text

    maker = row.get("m")
    return {
        "symbol": row.get("s") or symbol,
        "event_ns": _timestamp_ns(row.get("T")),
        "price": number(row.get("p")),
        "quantity": number(row.get("q")),
        "side": ("sell" if maker else "buy") if isinstance(maker, bool) else None,
        "trade_id": str(row["a"]) if row.get("a") is not None else None,
    }


def _json_rows(path: Path, chunk_rows: int) -> Iterator[list[Any]]:
    """JSON lines in chunks of `chunk_rows`; a JSON document (list) is read whole."""
    opener = gzip.open if path.suffix == ".gz" else open
    name = path.name.removesuffix(".gz")
    with opener(path, "rb") as fh:
        if name.endswith((".jsonl", ".ndjson")):
            chunk: list[Any] = []
            for line in fh:
                if line.strip():
                    chunk.append(orjson.loads(line))
                if len(chunk) >= chunk_rows:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk
            return
        doc = orjson.loads(fh.read())
    rows = doc if isinstance(doc, list) else [doc]
    for start in range(0, len(rows), chunk_rows):
        yield rows[start : start + chunk_rows]


def _first_line(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", errors="replace") as fh:
        return fh.readline().strip()


def csv_layout(path: Path) -> str:
    """Which CSV layout `path` holds: ``tardis``, ``kraken`` (headerless) or ``ccxt``.

    tardis.dev trades CSVs start with the header
    ``exchange,symbol,timestamp,local_timestamp,id,side,price,amount``; Kraken's
    public trades CSVs have no header, and their first field is a number.
    """
    first = _first_line(path)
    if first.replace(" ", "").startswith(",".join(TARDIS_COLUMNS)):
        return "tardis"
    head = first.split(",", 1)[0]
    try:
        float(head)
    except ValueError:
        return "ccxt"
    return "kraken"


def kraken_symbol(path: Path) -> str | None:
    """Kraken names its trade files by pair: `XBTUSDT.csv` -> `BTC/USDT` (None if unsure)."""
    stem = path.name.removesuffix(".gz").removesuffix(".csv").upper()
    for quote in KRAKEN_QUOTES:
        base = stem.removesuffix(quote)
        if base != stem and re.fullmatch(r"[A-Z0-9]{2,10}", base):
            return f"{_KRAKEN_ASSETS.get(base, base)}/{_KRAKEN_ASSETS.get(quote, quote)}"
    return None


def _arrow_csv(path: Path, names: list[str] | None, types: dict[str, Any]) -> Iterator[Any]:
    """A CSV (plain or .gz) as pyarrow record batches of about CSV_BLOCK_BYTES each."""
    import pyarrow as pa
    from pyarrow import csv

    read = csv.ReadOptions(column_names=names, block_size=CSV_BLOCK_BYTES)
    convert = csv.ConvertOptions(column_types=types)
    try:
        with csv.open_csv(str(path), read_options=read, convert_options=convert) as reader:
            yield from reader
    except pa.ArrowInvalid as exc:
        raise DataError(f"{path}: not a readable trade file: {exc}") from exc


def _kraken_frames(path: Path) -> Iterator[pd.DataFrame]:
    """Kraken `timestamp,price,volume` rows (seconds): no side and no trade id in the file.

    The trade id is the row's line number (stable across replays of one file, so the
    archive deduplicates a file imported twice); the side comes from the tick rule (a
    trade above the previous price was bought, below sold, equal: as the previous one;
    the file's first trade counts as a buy).
    """
    import pyarrow as pa

    types = {"timestamp": pa.float64(), "price": pa.float64(), "volume": pa.float64()}
    line, last_price, last_buy = 0, math.nan, True
    for batch in _arrow_csv(path, ["timestamp", "price", "volume"], types):
        price = batch.column("price").to_numpy(zero_copy_only=False)
        seconds = batch.column("timestamp").to_numpy(zero_copy_only=False)
        n = len(price)
        step = np.sign(np.diff(price, prepend=last_price))
        step[np.isnan(step)] = 0.0
        if n and step[0] == 0.0:
            step[0] = 1.0 if last_buy else -1.0
        filled = pd.Series(np.where(step == 0.0, np.nan, step)).ffill().to_numpy()
        is_buy = filled > 0
        ok = np.isfinite(seconds)
        micros = np.round(np.where(ok, seconds, 0.0) * 1e6).astype(np.int64)
        event_ns = pd.Series(micros * 1000, dtype="Int64").where(ok)
        frame = pd.DataFrame(
            {
                "timestamp": event_ns // NS_PER_MS,
                "event_ns": event_ns,
                "id": np.arange(line + 1, line + n + 1).astype(str),
                "side": np.where(is_buy, "buy", "sell"),
                "price": price,
                "amount": batch.column("volume").to_numpy(zero_copy_only=False),
            }
        )
        line += n
        if n:
            last_price, last_buy = float(price[-1]), bool(is_buy[-1])
        yield frame


def _tardis_frames(path: Path) -> Iterator[pd.DataFrame]:
    """tardis.dev trades (`timestamp` and `local_timestamp` in microseconds since the epoch)."""
    import pyarrow as pa

    types = {
        "exchange": pa.string(),
        "symbol": pa.string(),
        "timestamp": pa.int64(),
        "local_timestamp": pa.int64(),
        "id": pa.string(),
        "side": pa.string(),
        "price": pa.float64(),
        "amount": pa.float64(),
    }
    for batch in _arrow_csv(path, None, types):
        us = batch.column("timestamp").to_pandas()
        yield pd.DataFrame(
            {
                "symbol": batch.column("symbol").to_pandas(),
                "timestamp": us // 1000,
                "event_ns": (us * 1000).astype("Int64"),
                "id": batch.column("id").to_pandas(),
                "side": batch.column("side").to_pandas(),
                "price": batch.column("price").to_pandas(),
                "amount": batch.column("amount").to_pandas(),
            }
        )


def trade_frames(
    path: Path, symbol: str | None = None, chunk_rows: int = CHUNK_ROWS
) -> Iterator[pd.DataFrame]:
    """A columnar trade file as ccxt-style frames of bounded size, read as it goes.

    Columns: timestamp (ms), id, side, price, amount, and symbol where the file has
    one; Kraken and tardis.dev files also give `event_ns` (their finer time). Parquet
    is read `chunk_rows` rows at a time, CSV in blocks of CSV_BLOCK_BYTES (pandas for
    ccxt CSVs, whose columns may hold bad values to dead-letter; pyarrow's streaming
    reader for the fixed Kraken and tardis layouts), Feather batch by batch.

    Raises:
        DataError: The file is missing, of an unknown format, or lacks ccxt's columns.
    """
    if not path.exists():
        raise DataError(f"trade file not found: {path}")
    suffix = Path(path.name.removesuffix(".gz")).suffix
    if suffix == ".csv":
        layout = csv_layout(path)
        if layout == "kraken":
            symbol = symbol or kraken_symbol(path)
            if symbol is None:
                raise DataError(f"{path}: a Kraken trades CSV has no symbol; pass --symbol")
            frames: Iterator[pd.DataFrame] = _kraken_frames(path)
        elif layout == "tardis":
            frames = _tardis_frames(path)
        else:
            frames = iter(pd.read_csv(path, chunksize=chunk_rows))
    elif suffix == ".parquet" and path.suffix == ".parquet":
        import pyarrow.parquet as pq

        batches = pq.ParquetFile(path).iter_batches(batch_size=chunk_rows)
        frames = (batch.to_pandas() for batch in batches)
    elif suffix == ".feather" and path.suffix == ".feather":
        import pyarrow as pa

        reader = pa.ipc.open_file(path)
        frames = (reader.get_batch(i).to_pandas() for i in range(reader.num_record_batches))
    else:
        raise DataError(f"{path}: unknown trade file format {suffix!r}")
    for frame in frames:
        missing = {"timestamp", "price", "amount", "side"} - set(frame.columns)
        if missing:
            raise DataError(f"{path}: not a ccxt trade file, missing columns {sorted(missing)}")
        if symbol is not None and "symbol" not in frame.columns:
            frame = frame.assign(symbol=symbol)
        yield frame


def is_columnar(path: Path) -> bool:
    """Whether `trade_frames` reads `path` (else it is a JSON trade file)."""
    name = path.name
    return name.endswith((".parquet", ".feather", ".csv", ".csv.gz"))


def _row_tick(row: Any, symbol: str | None) -> dict[str, Any]:
    if isinstance(row, list) and len(row) == len(_FREQTRADE_ROW):
        row = dict(zip(_FREQTRADE_ROW, row, strict=True))
    if isinstance(row, dict) and "info" in row and "timestamp" not in row:
        row = row["info"]
    if isinstance(row, dict) and "T" in row and "p" in row:
        return _from_agg_trade(row, symbol)
    if isinstance(row, dict):
        return _from_ccxt(row, symbol)
    return {"raw": _clean(row)}  # kept: the worker dead-letters it


def _numpy_kind(column: pd.Series) -> str:
    """The numpy kind of a column's dtype ("i", "f"...); "O" for extension dtypes (NA-able)."""
    dtype = column.dtype
    return dtype.kind if isinstance(dtype, np.dtype) else "O"


def _cleaned(column: pd.Series) -> list[Any]:
    """`_clean` of every value of `column`, vectorised for numpy float and integer columns."""
    kind = _numpy_kind(column)
    if kind in "iub":
        return column.tolist()
    if kind == "f":
        values = column.tolist()
        for i in np.flatnonzero(~np.isfinite(column.to_numpy())).tolist():
            values[i] = None
        return values
    values = column.tolist()
    if kind == "O" and pd.api.types.infer_dtype(values, skipna=False) == "string":
        return values  # all str: `_clean` keeps them
    return [_clean(value) for value in values]


def _trade_id(value: Any) -> str | None:
    if isinstance(value, float) and value.is_integer():  # CSV ids next to a gap
        value = int(value)
    return str(value) if value is not None else None


def _event_ns(frame: pd.DataFrame) -> list[Any]:
    """Each row's event time as `_from_ccxt` gives it: `event_ns`, else `timestamp` ms in ns."""
    stamps = frame["timestamp"]
    ms = stamps.to_numpy()
    if _numpy_kind(stamps) == "i" and (not len(ms) or np.abs(ms).max() < 2**63 // NS_PER_MS):
        from_ms: list[Any] = (ms * NS_PER_MS).tolist()
    else:
        from_ms = [_timestamp_ns(value) for value in stamps.tolist()]
    if "event_ns" not in frame.columns:
        return from_ms
    finer = _cleaned(frame["event_ns"])
    return [e if e is not None else t for e, t in zip(finer, from_ms, strict=True)]


def frame_ticks_by_column(frame: pd.DataFrame, symbol: str | None) -> list[dict[str, Any]]:
    """A ccxt-style frame's tick dicts, column by column: what `_from_ccxt` gives row by row."""
    n = len(frame)
    columns = frame.columns
    nothing: list[Any] = [None] * n
    names = _cleaned(frame["symbol"]) if "symbol" in columns else nothing
    if "id" not in columns:
        trade_ids = nothing
    elif _numpy_kind(frame["id"]) in "iu":
        trade_ids = list(map(str, frame["id"].tolist()))
    else:
        trade_ids = [_trade_id(value) for value in _cleaned(frame["id"])]
    return [
        {
            "symbol": name or symbol,
            "event_ns": event_ns,
            "price": price,
            "quantity": quantity,
            "side": side,
            "trade_id": trade_id,
        }
        for name, event_ns, price, quantity, side, trade_id in zip(
            names,
            _event_ns(frame),
            _cleaned(frame["price"]),
            _cleaned(frame["amount"]),
            _cleaned(frame["side"]),
            trade_ids,
            strict=True,
        )
    ]


def frame_ticks_by_row(frame: pd.DataFrame, symbol: str | None) -> list[dict[str, Any]]:
    """The reference for `frame_ticks_by_column`: `_row_tick` per row of `to_dict("records")`."""
    return [_row_tick(row, symbol) for row in frame.to_dict("records")]


def _probe_rows(frame: pd.DataFrame) -> list[int]:
    """Rows to hold `frame_ticks_by_column` to its reference: the ends, the first with gaps."""
    gaps = np.flatnonzero(frame.isna().to_numpy().any(axis=1))[:PROBE_ROWS].tolist()
    ends = [0, len(frame) // 2, len(frame) - 1] if len(frame) else []
    return sorted(set(ends + gaps))


def frame_ticks(frame: pd.DataFrame, symbol: str | None) -> list[dict[str, Any]]:
    """The tick dicts of a frame from `trade_frames`, bad rows kept as `_from_ccxt` keeps them.

    Built column by column (a frame's columns converted once), fenced: the probe rows
    (the ends and the first rows with gaps) must equal the row-by-row reference, else
    the reference serves this frame and the reason is logged.
    """
    columns = frame.columns
    if not columns.is_unique or ("T" in columns and "p" in columns):
        return frame_ticks_by_row(frame, symbol)  # rows `_row_tick` reads as aggTrade
    ticks = frame_ticks_by_column(frame, symbol)
    probe = _probe_rows(frame)
    expected = frame_ticks_by_row(frame.iloc[probe], symbol)
    for i, reference in zip(probe, expected, strict=True):
        if ticks[i] != reference:
            logger.warning(
                "column-wise ticks differ from the row-by-row reference at row %d "
                "(%r != %r): this frame is read row by row",
                i,
                ticks[i],
                reference,
            )
            return frame_ticks_by_row(frame, symbol)
    return ticks


def trade_chunks(
    path: Path, symbol: str | None = None, chunk_rows: int = CHUNK_ROWS
) -> Iterator[list[dict[str, Any]]]:
    """Raw tick dicts (without recv_ns) in chunks of bounded size, invalid rows kept as they are.

    Formats: ccxt trades as Parquet, CSV, Feather or JSON (list of dicts), freqtrade's
    JSON list rows, raw Binance aggTrade JSON (list or JSON lines), Kraken's headerless
    `timestamp,price,volume` CSV and tardis.dev trades CSV; `.gz` CSV and JSON too.
    The symbol comes from the row, else `symbol`, else the file name (freqtrade's
    `BASE_QUOTE-trades.*`, Kraken's `PAIR.csv`). Only a JSON document (not JSON lines)
    is read whole; everything else is read `chunk_rows` rows (or a CSV block) at a time.

    Raises:
        DataError: The file is missing or unreadable, or its rows have no symbol.
    """
    if not path.exists():
        raise DataError(f"trade file not found: {path}")
    symbol = symbol or symbol_from_filename(path)
    name = path.name.removesuffix(".gz")
    if is_columnar(path):
        chunks: Iterator[list[dict[str, Any]]] = (
            frame_ticks(frame, symbol) for frame in trade_frames(path, symbol, chunk_rows)
        )
    elif name.endswith((".json", ".jsonl", ".ndjson")):
        chunks = ([_row_tick(row, symbol) for row in rows] for rows in _json_rows(path, chunk_rows))
    else:
        raise DataError(f"{path}: unknown trade file format {Path(name).suffix!r}")
    for ticks in chunks:
        if symbol is None and any(t.get("symbol") is None for t in ticks if "raw" not in t):
            raise DataError(f"{path}: rows have no symbol; pass --symbol")
        yield ticks


def read_trades(path: Path, symbol: str | None = None) -> list[dict[str, Any]]:
    """Every raw tick dict of a (small) trade file at once: see `trade_chunks`."""
    return [tick for chunk in trade_chunks(path, symbol) for tick in chunk]


@dataclass(frozen=True, slots=True)
class SyntheticMarket:
    """A seeded multi-symbol random-walk market with event time = wall-clock now.

    Prices follow geometric Brownian motion per symbol; sides and sizes are random.
    """

    symbols: int = 10
    seed: int = 7
    volatility: float = 2e-4

    def ticks(self, count: int) -> Iterator[dict[str, Any]]:
        """`count` raw tick dicts without event_ns (`publish` stamps it when sending)."""
        rng = np.random.default_rng(self.seed)
        names = [f"SYN{i:03d}/USD" for i in range(self.symbols)]
        prices = 100.0 * np.exp(rng.normal(0, 0.5, self.symbols))
        for n in range(count):
            k = int(rng.integers(self.symbols))
            prices[k] *= math.exp(rng.normal(0.0, self.volatility))
            yield {
                "symbol": names[k],
                "price": round(float(prices[k]), 6),
                "quantity": round(float(rng.exponential(1.0)), 6),
                "side": "buy" if rng.random() < 0.5 else "sell",
                "trade_id": f"syn-{self.seed}-{n}",
            }


@dataclass(frozen=True, slots=True)
class Pacing:
    """How fast to send: `rate` ticks/s, or `speed` x original time (0 = as fast as possible)."""

    speed: float = 0.0
    rate: float = 0.0


async def _paced(
    ticks: Iterable[dict[str, Any]],
    pacing: Pacing,
    idle: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """`ticks` at their pace; `idle` runs before each wait (so nothing sent waits with it)."""
    start = time.monotonic()
    first_event: int | None = None
    for n, tick in enumerate(ticks):
        if pacing.rate > 0:
            due = start + n / pacing.rate
        elif pacing.speed > 0 and isinstance(tick.get("event_ns"), int):
            first_event = first_event if first_event is not None else tick["event_ns"]
            due = start + (tick["event_ns"] - first_event) / 1e9 / pacing.speed
        else:
            due = 0.0
        delay = due - time.monotonic()
        if delay > 0.001:
            if idle is not None:
                await idle()
            await asyncio.sleep(max(due - time.monotonic(), 0.0))
        elif n % 1000 == 0:
            await asyncio.sleep(0)  # let the producer's sender task run
        yield tick


async def publish(
    ticks: Iterable[dict[str, Any]],
    bootstrap: str,
    topic: str,
    pacing: Pacing = Pacing(),
    linger_ms: int = 5,
    security: KafkaSecurity = PLAINTEXT,
    tracing: Tracing | None = None,
) -> int:
    """Send raw tick dicts to `topic`, keyed by symbol, stamping recv_ns (and missing event_ns).

    Ticks go out in one record batch per partition (`PartitionBatches`), sent when full
    or `linger_ms` old and before each wait of the pacing; a symbol's ticks land on the
    partition `producer.send` would pick for its key. Raw (invalid) rows have no key:
    they go round-robin over the partitions, for the worker to dead-letter.

    With `tracing`, a fraction `tracing.sample_rate` of the ticks is traced, at most
    `tracing.max_per_second` a second (`TraceBudget`): each gets
    a `send <topic>` span, ended on the broker's ack of its batch, and its
    `traceparent` header.

    Returns the number of records acknowledged by the broker.

    Raises:
        BrokerUnavailable: Nothing answered at `bootstrap`.
        BrokerAuthError: The broker refused the TLS handshake or the SASL login.
        BrokerError: The producer failed to send or the broker refused a record.
    """
    producer = make_producer(bootstrap, linger_ms, security)
    await start_client(producer, bootstrap, security)
    batches = PartitionBatches(producer, topic, linger_ms)
    draw = random.Random().random
    budget = TraceBudget(tracing.max_per_second if tracing is not None else 0.0)
    try:
        async for tick in _paced(ticks, pacing, batches.flush):
            now = time.time_ns()
            if "raw" in tick:
                value, key = orjson.dumps(tick["raw"]), None
            else:
                if "event_ns" not in tick:
                    tick = {**tick, "event_ns": now}
                value = orjson.dumps({**tick, "recv_ns": now})
                symbol = tick.get("symbol")
                key = symbol.encode() if isinstance(symbol, str) else None
            if (
                tracing is not None
                and draw() < tracing.sample_rate
                and budget.take(time.monotonic())
            ):
                span = _send_span(tracing, topic)
                headers = [(TRACEPARENT, traceparent(span))]
                await batches.append(key, value, now, headers, on_ack=span.end)
            else:
                await batches.append(key, value, now)
        return await batches.drain()
    except KafkaError as exc:
        message = f"sending ticks failed after {batches.acknowledged} were acknowledged: {exc}"
        raise BrokerError(message, topic=topic) from exc
    finally:
        await producer.stop()


def _send_span(tracing: Tracing, topic: str) -> Span:
    """A traced tick's `send <topic>` span; it ends when the broker acks the tick's batch."""
    return tracing.tracer.start_span(
        f"send {topic}", kind=SpanKind.PRODUCER, attributes=messaging(topic, "send", "send")
    )
