"""The ClickHouse archive of ticks and signals, and the archiver that fills it from Kafka."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pandas as pd
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from stream.contracts.tick import TickColumns, decode_batch
from stream.kafka.clients import make_consumer, start_client, wait_assigned
from stream.kafka.security import PLAINTEXT, KafkaSecurity
from tickserve.errors import ArchiveError, BrokerError, ConfigError
from tickserve.tracing import Tracing, consumer_spans

logger = logging.getLogger(__name__)

TICK_COLUMNS = ("symbol", "event_ns", "trade_id", "price", "quantity", "is_buy", "recv_ns")
SIGNAL_COLUMNS = (
    "symbol",
    "event_ns",
    "trade_id",
    "recv_ns",
    "emit_ns",
    "model",
    "version",
    "score",
    "direction",
    "ready",
)
SOURCE_COLUMNS = ("kafka_partition", "kafka_offset")

# Both tables are ReplacingMergeTree keyed by what a record *is* (a trade; a model
# version's answer to a trade) and read with FINAL: a batch inserted and then
# redelivered after a crash (insert done, commit lost) collapses into one row, and
# so does a trade imported twice. kafka_partition/kafka_offset record where each row
# came from (-1 for file imports).
_CREATE_TICKS = """
CREATE TABLE IF NOT EXISTS ticks (
    symbol LowCardinality(String),
    event_ns Int64,
    trade_id String,
    price Float64,
    quantity Float64,
    is_buy UInt8,
    recv_ns Int64,
    kafka_partition Int32 DEFAULT -1,
    kafka_offset Int64 DEFAULT -1,
    event_time DateTime64(9, 'UTC') MATERIALIZED fromUnixTimestamp64Nano(event_ns)
)
ENGINE = ReplacingMergeTree
ORDER BY (symbol, event_ns, trade_id)
"""
_CREATE_SIGNALS = """
CREATE TABLE IF NOT EXISTS signals (
    symbol LowCardinality(String),
    event_ns Int64,
    trade_id String,
    recv_ns Int64,
    emit_ns Int64,
    model LowCardinality(String),
    version LowCardinality(String),
    score Nullable(Float64),
    direction Int8,
    ready UInt8,
    kafka_partition Int32 DEFAULT -1,
    kafka_offset Int64 DEFAULT -1,
    event_time DateTime64(9, 'UTC') MATERIALIZED fromUnixTimestamp64Nano(event_ns)
)
ENGINE = ReplacingMergeTree
ORDER BY (symbol, event_ns, trade_id, model, version)
"""
# Tables made by the walking skeleton lack the source columns.
_MIGRATE = [
    "ALTER TABLE ticks ADD COLUMN IF NOT EXISTS kafka_partition Int32 DEFAULT -1",
    "ALTER TABLE ticks ADD COLUMN IF NOT EXISTS kafka_offset Int64 DEFAULT -1",
]
_SETUP = [("ticks", _CREATE_TICKS), ("signals", _CREATE_SIGNALS), *(("ticks", m) for m in _MIGRATE)]

# Time bars of archived ticks, computed by ClickHouse; equal to the Numba kernels' bars
# (ticks taken in archive order: event time, then trade id). Bars without trades are
# absent here; the kernels carry the last close into them with zero volume.
_BARS = """
SELECT
    symbol,
    intDiv(event_ns, {{bar_ns:Int64}}) AS bar,
    argMin(price, (event_ns, length(trade_id), trade_id)) AS open,
    max(price) AS high,
    min(price) AS low,
    argMax(price, (event_ns, length(trade_id), trade_id)) AS close,
    sumKahan(quantity) AS volume,
    sumKahanIf(quantity, is_buy = 1) AS buy_volume,
    count() AS trades
FROM ticks FINAL
{where}
GROUP BY symbol, bar
ORDER BY symbol, bar
"""


@contextmanager
def _statement(table: str, what: str) -> Iterator[None]:
    """Turn a ClickHouse error of one statement into an ArchiveError naming the table."""
    from clickhouse_connect.driver.exceptions import ClickHouseError

    try:
        yield
    except ClickHouseError as exc:
        raise ArchiveError(f"{what} failed: {exc}", table=table) from exc


class ClickHouseArchive:
    """Archived ticks and signals behind `clickhouse-connect` (embedded chdb:// or a server URL).

    Every method raises ArchiveError (naming the table) where ClickHouse fails a statement.
    """

    def __init__(self, client: Any):
        """Wrap a connected client (use `open`)."""
        self.client = client

    @classmethod
    def open(cls, dsn: str) -> ClickHouseArchive:
        """Connect to `dsn` and create (or migrate) the tables if needed."""
        import clickhouse_connect

        try:
            client = clickhouse_connect.get_client(dsn=dsn)
        except Exception as exc:  # driver raises several types for bad DSNs
            raise ConfigError(f"cannot open ClickHouse at {dsn}: {exc}") from exc
        for table, statement in _SETUP:
            with _statement(table, "creating or migrating the table"):
                client.command(statement)
        return cls(client)

    def insert_ticks(
        self,
        cols: TickColumns,
        partition: np.ndarray | None = None,
        offset: np.ndarray | None = None,
    ) -> None:
        """Insert one decoded batch (a single INSERT); `partition`/`offset` per row from Kafka."""
        n = len(cols)
        if not n:
            return
        data = [
            cols.symbols,
            cols.event_ns,
            cols.trade_ids,
            cols.price,
            cols.quantity,
            cols.is_buy.astype("uint8"),
            cols.recv_ns,
            partition if partition is not None else np.full(n, -1, np.int32),
            offset if offset is not None else np.full(n, -1, np.int64),
        ]
        names = [*TICK_COLUMNS, *SOURCE_COLUMNS]
        with _statement("ticks", f"inserting {n} ticks"):
            self.client.insert("ticks", data, column_names=names, column_oriented=True)

    def insert_tick_table(self, table: Any) -> None:
        """Bulk insert a pyarrow Table with the TICK_COLUMNS (backfills; one INSERT)."""
        if table.num_rows:
            with _statement("ticks", f"inserting {table.num_rows} ticks"):
                self.client.insert_arrow("ticks", table.select(list(TICK_COLUMNS)))

    def insert_signals(self, rows: SignalRows) -> None:
        """Insert decoded signals (a single INSERT)."""
        if not rows.symbol:
            return
        data = [getattr(rows, name) for name in (*SIGNAL_COLUMNS, *SOURCE_COLUMNS)]
        names = [*SIGNAL_COLUMNS, *SOURCE_COLUMNS]
        with _statement("signals", f"inserting {len(rows.symbol)} signals"):
            self.client.insert("signals", data, column_names=names, column_oriented=True)

    def count_ticks(self) -> int:
        """Distinct archived ticks."""
        with _statement("ticks", "counting"):
            return int(self.client.command("SELECT count() FROM ticks FINAL"))

    def count_signals(self) -> int:
        """Distinct archived signals."""
        with _statement("signals", "counting"):
            return int(self.client.command("SELECT count() FROM signals FINAL"))

    def read_ticks(self, symbols: list[str] | None = None) -> pd.DataFrame:
        """Archived ticks in stream order per symbol (event time, then trade id)."""
        where = "WHERE symbol IN {symbols:Array(String)}" if symbols else ""
        query = (
            f"SELECT symbol, event_ns, trade_id, price, quantity, is_buy FROM ticks FINAL {where} "
            "ORDER BY symbol, event_ns, length(trade_id), trade_id"
        )
        params = {"symbols": symbols} if symbols else None
        with _statement("ticks", "reading ticks"):
            return self.client.query_df(query, parameters=params)  # type: ignore[no-any-return]

    def read_bars(self, bar_ns: int, symbols: list[str] | None = None) -> pd.DataFrame:
        """OHLCV time bars of `bar_ns` computed in ClickHouse (bars with at least one trade).

        Columns: symbol, bar (event_ns // bar_ns), open, high, low, close, volume,
        buy_volume, trades.
        """
        where = "WHERE symbol IN {symbols:Array(String)}" if symbols else ""
        params: dict[str, object] = {"bar_ns": bar_ns}
        if symbols:
            params["symbols"] = symbols
        query = _BARS.format(where=where)
        with _statement("ticks", f"reading bars of {bar_ns} ns"):
            return self.client.query_df(query, parameters=params)  # type: ignore[no-any-return]


@dataclass(slots=True)
class SignalRows:
    """Decoded signal records as columns, ready for one INSERT."""

    symbol: list[str] = field(default_factory=list)
    event_ns: list[int] = field(default_factory=list)
    trade_id: list[str] = field(default_factory=list)
    recv_ns: list[int] = field(default_factory=list)
    emit_ns: list[int] = field(default_factory=list)
    model: list[str] = field(default_factory=list)
    version: list[str] = field(default_factory=list)
    score: list[float | None] = field(default_factory=list)
    direction: list[int] = field(default_factory=list)
    ready: list[int] = field(default_factory=list)
    kafka_partition: list[int] = field(default_factory=list)
    kafka_offset: list[int] = field(default_factory=list)


def decode_signals(records: list[ConsumerRecord[bytes, bytes]]) -> tuple[SignalRows, int]:
    """Decode `signals` records into columns; returns the rows and how many were skipped."""
    rows = SignalRows()
    skipped = 0
    for r in records:
        try:
            doc = orjson.loads(r.value) if r.value is not None else None
            if not isinstance(doc, dict):
                raise TypeError("not an object")
            score = doc["score"]
            parsed = (
                str(doc["symbol"]),
                int(doc["event_ns"]),
                str(doc["trade_id"]),
                int(doc["recv_ns"]),
                int(doc["emit_ns"]),
                str(doc["model"]),
                str(doc["version"]),
                None if score is None else float(score),
                int(doc["direction"]),
                int(bool(doc["ready"])),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            skipped += 1
            continue
        for name, value in zip(SIGNAL_COLUMNS, parsed, strict=True):
            getattr(rows, name).append(value)
        rows.kafka_partition.append(r.partition)
        rows.kafka_offset.append(r.offset)
    return rows, skipped


@dataclass(frozen=True, slots=True)
class ArchiverConfig:
    """What the archiver reads and how (`signals_topic=None`: ticks only)."""

    bootstrap: str
    topic: str
    group_id: str
    max_batch: int = 20_000
    fetch_max_wait_ms: int = 50
    max_future_ns: int = 5_000_000_000
    signals_topic: str | None = None
    security: KafkaSecurity = PLAINTEXT


@dataclass(slots=True)
class ArchiveCounts:
    """What one archiver run wrote (rows inserted, records skipped as invalid)."""

    ticks: int = 0
    signals: int = 0
    skipped: int = 0
    # monotonic seconds: first batch received, last batch committed (for throughput)
    first_batch_s: float | None = None
    last_commit_s: float | None = None


def _archive_ticks(
    archive: ClickHouseArchive, records: list[ConsumerRecord[bytes, bytes]], max_future_ns: int
) -> tuple[int, int]:
    values = [m.value for m in records]
    cols, rejected = decode_batch(values, time.time_ns(), max_future_ns)
    partition = np.fromiter((m.partition for m in records), np.int32, len(records))[cols.index]
    offset = np.fromiter((m.offset for m in records), np.int64, len(records))[cols.index]
    archive.insert_ticks(cols, partition, offset)
    return len(cols), len(rejected)


async def run_archiver(
    archive: ClickHouseArchive,
    config: ArchiverConfig,
    stop: asyncio.Event,
    idle_exit_s: float | None = None,
    counts: ArchiveCounts | None = None,
    tracing: Tracing | None = None,
) -> int:
    """Consume ticks (and signals) in large batches into ClickHouse; commit after each insert.

    Offsets of a batch are committed only once every row of it is inserted, so a
    crash replays the batch (deduplicated by the tables' keys) and never skips it.
    Invalid records are skipped and counted (the worker dead-letters bad ticks).
    Returns the number of ticks inserted; `counts`, if given, receives all totals.
    With `idle_exit_s`, returns once no record has arrived for that long. With
    `tracing`, each traced tick or signal gets a `process` span in its trace, from
    its batch's arrival to its commit.

    Raises:
        BrokerUnavailable: Nothing answered at the bootstrap address.
        BrokerError: Fetching or committing failed.
        ArchiveError: ClickHouse failed an insert (the batch is not committed).
    """
    counts = counts if counts is not None else ArchiveCounts()
    topics = [config.topic] + ([config.signals_topic] if config.signals_topic else [])
    consumer = make_consumer(
        config.bootstrap,
        config.group_id,
        topics,
        config.fetch_max_wait_ms,
        config.max_batch,
        security=config.security,
    )
    await start_client(consumer, config.bootstrap, config.security)
    try:
        await wait_assigned(consumer)
        last_record = time.monotonic()
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=200, max_records=config.max_batch)
            if not batches:
                if idle_exit_s is not None and time.monotonic() - last_record > idle_exit_s:
                    break
                continue
            last_record = time.monotonic()
            if counts.first_batch_s is None:
                counts.first_batch_s = last_record
            tick_records = [m for tp, ms in batches.items() if tp.topic == config.topic for m in ms]
            signal_records = [
                m for tp, ms in batches.items() if tp.topic != config.topic for m in ms
            ]
            traced = []
            if tracing is not None:
                now, group = time.time_ns(), config.group_id
                traced = consumer_spans(tracing, tick_records, config.topic, group, now)
                if config.signals_topic:
                    topic = config.signals_topic
                    traced += consumer_spans(tracing, signal_records, topic, group, now)
            # Blocking inserts: the archiver has nothing else to do meanwhile.
            if tick_records:
                inserted, skipped = _archive_ticks(archive, tick_records, config.max_future_ns)
                counts.ticks += inserted
                counts.skipped += skipped
            if signal_records:
                rows, skipped = decode_signals(signal_records)
                archive.insert_signals(rows)
                counts.signals += len(rows.symbol)
                counts.skipped += skipped
            offsets: dict[TopicPartition, int] = {
                tp: msgs[-1].offset + 1 for tp, msgs in batches.items()
            }
            await consumer.commit(offsets)
            counts.last_commit_s = time.monotonic()
            for span in traced:
                span.end()
            logger.debug("archived", extra={"ticks": counts.ticks, "signals": counts.signals})
    except KafkaError as exc:
        raise BrokerError(f"archiving failed: {exc}", topic=config.topic) from exc
    finally:
        await consumer.stop()
    logger.info(
        "archiver stopped",
        extra={"ticks": counts.ticks, "signals": counts.signals, "skipped": counts.skipped},
    )
    return counts.ticks
