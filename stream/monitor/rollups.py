"""The monitor's figures, written to ClickHouse at intervals (`monitor_rollups`) for analysis."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from tickserve.errors import ArchiveError, ConfigError

TABLE = "monitor_rollups"
COLUMNS = (
    "at_ns",
    "kind",
    "model",
    "version",
    "symbol",
    "window",
    "feature",
    "value",
    "hits",
    "total",
)

# One row per figure and write: kind `accuracy` (symbol, window, hits of total calls)
# or `psi` (feature; total = live rows binned). ORDER BY puts a figure's history together.
_CREATE = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    at_ns Int64,
    kind LowCardinality(String),
    model LowCardinality(String),
    version LowCardinality(String),
    symbol LowCardinality(String),
    window LowCardinality(String),
    feature LowCardinality(String),
    value Float64,
    hits Int64,
    total Int64,
    at DateTime64(9, 'UTC') MATERIALIZED fromUnixTimestamp64Nano(at_ns)
)
ENGINE = MergeTree
ORDER BY (kind, model, version, symbol, window, feature, at_ns)
"""


@dataclass(frozen=True, slots=True)
class Rollup:
    """One figure at one instant (a row of `monitor_rollups`)."""

    kind: str
    model: str
    version: str
    value: float
    total: int
    hits: int = 0
    symbol: str = ""
    window: str = ""
    feature: str = ""


class RollupWriter:
    """Inserts rollups through clickhouse-connect (embedded chdb:// or a server URL)."""

    def __init__(self, client: Any) -> None:
        """Wrap a connected client (use `open`)."""
        self.client = client

    @classmethod
    def open(cls, dsn: str) -> RollupWriter:
        """Connect to `dsn` and create the table if needed.

        Raises:
            ConfigError: The DSN does not open.
            ArchiveError: The table cannot be created.
        """
        import clickhouse_connect
        from clickhouse_connect.driver.exceptions import ClickHouseError

        try:
            client = clickhouse_connect.get_client(dsn=dsn)
        except Exception as exc:  # the driver raises several types for bad DSNs
            raise ConfigError(f"cannot open ClickHouse at {dsn}: {exc}") from exc
        try:
            client.command(_CREATE)
        except ClickHouseError as exc:
            raise ArchiveError(f"creating the table failed: {exc}", table=TABLE) from exc
        return cls(client)

    def write(self, rollups: list[Rollup], at_ns: int | None = None) -> None:
        """Insert `rollups` stamped `at_ns` (now by default), one INSERT."""
        from clickhouse_connect.driver.exceptions import ClickHouseError

        if not rollups:
            return
        at = time.time_ns() if at_ns is None else at_ns
        rows = [
            (
                at,
                r.kind,
                r.model,
                r.version,
                r.symbol,
                r.window,
                r.feature,
                r.value,
                r.hits,
                r.total,
            )
            for r in rollups
        ]
        try:
            self.client.insert(TABLE, rows, column_names=list(COLUMNS))
        except ClickHouseError as exc:
            raise ArchiveError(f"inserting {len(rows)} rollups failed: {exc}", table=TABLE) from exc

    def latest(self) -> list[dict[str, Any]]:
        """The newest row of each figure (for tests and analysis)."""
        from clickhouse_connect.driver.exceptions import ClickHouseError

        query = (
            f"SELECT kind, model, version, symbol, window, feature, "
            f"argMax(value, at_ns) AS value, argMax(hits, at_ns) AS hits, "
            f"argMax(total, at_ns) AS total FROM {TABLE} "
            "GROUP BY kind, model, version, symbol, window, feature"
        )
        try:
            result = self.client.query(query)
        except ClickHouseError as exc:
            raise ArchiveError(f"reading rollups failed: {exc}", table=TABLE) from exc
        return [dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]
