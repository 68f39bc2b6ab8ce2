"""Feed adapters: replay trade files (ccxt, freqtrade, Binance aggTrade) or a synthetic market."""

from __future__ import annotations

import asyncio
import gzip
import logging
import math
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
from aiokafka.errors import KafkaError
from opentelemetry.trace import SpanKind

from stream.kafka.clients import make_producer, start_client
from stream.kafka.security import PLAINTEXT, KafkaSecurity
from tickserve.errors import BrokerError, DataError
from tickserve.tracing import TRACEPARENT, Tracing, messaging, traceparent

logger = logging.getLogger(__name__)

NS_PER_MS = 1_000_000
# freqtrade's list rows: [timestamp, id, type, side, price, amount, cost]
_FREQTRADE_ROW = ("timestamp", "id", "type", "side", "price", "amount", "cost")


def _clean(value: Any) -> Any:
    """JSON-safe scalar: numpy to Python, NaN/NaT/None to None; other values unchanged."""
    if value is None or value is pd.NaT:
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
    return {
        "symbol": _clean(row.get("symbol")) or symbol,
        "event_ns": _timestamp_ns(row.get("timestamp")),
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


def _json_rows(path: Path) -> list[Any]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    name = path.name.removesuffix(".gz")
    if name.endswith((".jsonl", ".ndjson")):
        return [orjson.loads(line) for line in raw.splitlines() if line.strip()]
    doc = orjson.loads(raw)
    return doc if isinstance(doc, list) else [doc]


def read_trades(path: Path, symbol: str | None = None) -> list[dict[str, Any]]:
    """Read a trade file into raw tick dicts (without recv_ns), invalid rows kept as they are.

    Formats: ccxt trades as Parquet, CSV, Feather or JSON (list of dicts), freqtrade's
    JSON list rows, raw Binance aggTrade JSON (list or JSON lines); `.gz` JSON too.
    The symbol comes from the row, else `symbol`, else the freqtrade file name.
    """
    if not path.exists():
        raise DataError(f"trade file not found: {path}")
    symbol = symbol or symbol_from_filename(path)
    name = path.name.removesuffix(".gz")
    suffix = Path(name).suffix
    if suffix in (".parquet", ".csv", ".feather"):
        readers: dict[str, Callable[[Path], pd.DataFrame]] = {
            ".parquet": pd.read_parquet,
            ".csv": pd.read_csv,
            ".feather": pd.read_feather,
        }
        frame = readers[suffix](path)
        missing = {"timestamp", "price", "amount", "side"} - set(frame.columns)
        if missing:
            raise DataError(f"{path}: not a ccxt trade file, missing columns {sorted(missing)}")
        rows: list[Any] = frame.to_dict("records")
    elif suffix in (".json", ".jsonl", ".ndjson"):
        rows = _json_rows(path)
    else:
        raise DataError(f"{path}: unknown trade file format {suffix!r}")
    ticks = []
    for row in rows:
        if isinstance(row, list) and len(row) == len(_FREQTRADE_ROW):
            row = dict(zip(_FREQTRADE_ROW, row, strict=True))
        if isinstance(row, dict) and "info" in row and "timestamp" not in row:
            row = row["info"]
        if isinstance(row, dict) and "T" in row and "p" in row:
            ticks.append(_from_agg_trade(row, symbol))
        elif isinstance(row, dict):
            ticks.append(_from_ccxt(row, symbol))
        else:
            ticks.append({"raw": _clean(row)})  # kept: the worker dead-letters it
    if any(t.get("symbol") is None for t in ticks if "raw" not in t) and symbol is None:
        raise DataError(f"{path}: rows have no symbol; pass --symbol")
    return ticks


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


async def _paced(ticks: Iterable[dict[str, Any]], pacing: Pacing) -> AsyncIterator[dict[str, Any]]:
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
            await asyncio.sleep(delay)
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

    With `tracing`, a fraction `tracing.sample_rate` of the ticks is traced: each gets
    a `send <topic>` span, ended on the broker's ack, and its `traceparent` header.

    Returns the number of records acknowledged by the broker.

    Raises:
        BrokerUnavailable: Nothing answered at `bootstrap`.
        BrokerAuthError: The broker refused the TLS handshake or the SASL login.
        BrokerError: The producer failed to send or the broker refused a record.
    """
    producer = make_producer(bootstrap, linger_ms, security)
    await start_client(producer, bootstrap, security)
    sent = 0
    pending: list[asyncio.Future[Any]] = []
    draw = random.Random().random
    try:
        async for tick in _paced(ticks, pacing):
            now = time.time_ns()
            if "raw" in tick:
                value, key = orjson.dumps(tick["raw"]), None
            else:
                if "event_ns" not in tick:
                    tick = {**tick, "event_ns": now}
                value = orjson.dumps({**tick, "recv_ns": now})
                symbol = tick.get("symbol")
                key = symbol.encode() if isinstance(symbol, str) else None
            if tracing is not None and draw() < tracing.sample_rate:
                pending.append(await _send_traced(producer, tracing, topic, value, key))
            else:
                pending.append(await producer.send(topic, value, key=key))
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                sent += len(pending)
                pending.clear()
        await asyncio.gather(*pending)
        sent += len(pending)
    except KafkaError as exc:
        message = f"sending ticks failed after {sent} were acknowledged: {exc}"
        raise BrokerError(message, topic=topic) from exc
    finally:
        await producer.stop()
    return sent


async def _send_traced(
    producer: Any, tracing: Tracing, topic: str, value: bytes, key: bytes | None
) -> asyncio.Future[Any]:
    """Send one tick with a `traceparent` header; its span ends when the broker acks it."""
    span = tracing.tracer.start_span(
        f"send {topic}", kind=SpanKind.PRODUCER, attributes=messaging(topic, "send", "send")
    )
    sent: asyncio.Future[Any] = await producer.send(
        topic, value, key=key, headers=[(TRACEPARENT, traceparent(span))]
    )
    sent.add_done_callback(lambda _: span.end())
    return sent
