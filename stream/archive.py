"""The tick archive in ClickHouse, and the archiver that fills it from topic `ticks`."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import pandas as pd
from aiokafka import TopicPartition

from stream.kafka import make_consumer, start_client, wait_assigned
from stream.tick import TickColumns, decode_batch
from tickserve.errors import ConfigError

logger = logging.getLogger(__name__)

TICK_COLUMNS = ("symbol", "event_ns", "trade_id", "price", "quantity", "is_buy", "recv_ns")

_CREATE_TICKS = """
CREATE TABLE IF NOT EXISTS ticks (
    symbol LowCardinality(String),
    event_ns Int64,
    trade_id String,
    price Float64,
    quantity Float64,
    is_buy UInt8,
    recv_ns Int64,
    event_time DateTime64(9, 'UTC') MATERIALIZED fromUnixTimestamp64Nano(event_ns)
)
ENGINE = ReplacingMergeTree
ORDER BY (symbol, event_ns, trade_id)
"""


class ClickHouseArchive:
    """Archived ticks behind `clickhouse-connect` (embedded chdb:// or a server URL).

    Rows are keyed by (symbol, event_ns, trade_id) in a ReplacingMergeTree and read
    with FINAL, so replaying the same ticks after a crash or a second import does
    not double-count them.
    """

    def __init__(self, client: object):
        """Wrap a connected client (use `open`)."""
        self.client = client

    @classmethod
    def open(cls, dsn: str) -> ClickHouseArchive:
        """Connect to `dsn` and create the tables if needed."""
        import clickhouse_connect

        try:
            client = clickhouse_connect.get_client(dsn=dsn)
        except Exception as exc:  # driver raises several types for bad DSNs
            raise ConfigError(f"cannot open ClickHouse at {dsn}: {exc}") from exc
        client.command(_CREATE_TICKS)
        return cls(client)

    def insert_ticks(self, cols: TickColumns) -> None:
        """Insert one decoded batch (a single INSERT)."""
        if not len(cols):
            return
        data = [
            cols.symbols, cols.event_ns, cols.trade_ids, cols.price, cols.quantity,
            cols.is_buy.astype("uint8"), cols.recv_ns,
        ]  # fmt: skip
        self.client.insert("ticks", data, column_names=list(TICK_COLUMNS), column_oriented=True)  # type: ignore[attr-defined]

    def count_ticks(self) -> int:
        """Distinct archived ticks."""
        return int(self.client.command("SELECT count() FROM ticks FINAL"))  # type: ignore[attr-defined]

    def read_ticks(self, symbols: list[str] | None = None) -> pd.DataFrame:
        """Archived ticks in stream order per symbol (event time, then trade id)."""
        where = "WHERE symbol IN {symbols:Array(String)}" if symbols else ""
        query = (
            f"SELECT symbol, event_ns, trade_id, price, quantity, is_buy FROM ticks FINAL {where} "
            "ORDER BY symbol, event_ns, length(trade_id), trade_id"
        )
        params = {"symbols": symbols} if symbols else None
        return self.client.query_df(query, parameters=params)  # type: ignore[attr-defined,no-any-return]


@dataclass(frozen=True, slots=True)
class ArchiverConfig:
    """What the archiver reads and how."""

    bootstrap: str
    topic: str
    group_id: str
    max_batch: int = 20_000
    fetch_max_wait_ms: int = 50
    max_future_ns: int = 5_000_000_000


async def run_archiver(
    archive: ClickHouseArchive,
    config: ArchiverConfig,
    stop: asyncio.Event,
    idle_exit_s: float | None = None,
) -> int:
    """Consume ticks in large batches into ClickHouse; commit offsets after each insert.

    Invalid records are skipped here (the worker dead-letters them). Returns the
    number of ticks inserted. With `idle_exit_s`, returns once no record has
    arrived for that long (backfills, the demo, tests).
    """
    consumer = make_consumer(
        config.bootstrap, config.group_id, [config.topic], config.fetch_max_wait_ms,
        config.max_batch,
    )  # fmt: skip
    await start_client(consumer, config.bootstrap)
    inserted = 0
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
            values = [m.value for msgs in batches.values() for m in msgs]
            cols, rejected = decode_batch(values, time.time_ns(), config.max_future_ns)
            # A blocking insert: the archiver has nothing else to do meanwhile.
            archive.insert_ticks(cols)
            offsets: dict[TopicPartition, int] = {
                tp: msgs[-1].offset + 1 for tp, msgs in batches.items()
            }
            await consumer.commit(offsets)
            inserted += len(cols)
            logger.debug("archived", extra={"rows": len(cols), "skipped": len(rejected)})
    finally:
        await consumer.stop()
    logger.info("archiver stopped", extra={"inserted": inserted})
    return inserted
