"""The Redis online store through Feast, written off the hot path by a coalescing thread."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import redis
from prometheus_client import Counter, Histogram

from features.feature_repo import definitions
from features.spec import FeatureSpec
from tickserve.errors import ConfigError, OnlineStoreError

if TYPE_CHECKING:
    from feast import FeatureStore, FeatureView

logger = logging.getLogger(__name__)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

ONLINE_WRITES = Counter("online_store_writes_total", "Feature rows written to the online store")
ONLINE_FAILURES = Counter(
    "online_store_write_failures_total", "Online store flushes that failed (retried)"
)
ONLINE_FRESHNESS = Histogram(
    "online_store_freshness_seconds",
    "Tick event time to the row being visible in the online store (wall clock)",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60),
)


def feast_connection_string(redis_url: str) -> str:
    """Translate a redis:// URL into Feast's `host:port,db=N[,password=...]` form.

    >>> feast_connection_string("redis://127.0.0.1:6379/3")
    '127.0.0.1:6379,db=3'
    """
    url = urlparse(redis_url)
    if url.scheme not in ("redis", "rediss") or not url.hostname:
        raise ConfigError(f"REDIS_URL must look like redis://host:port/db, got {redis_url!r}")
    parts = [f"{url.hostname}:{url.port or 6379}"]
    db = url.path.lstrip("/")
    if db:
        parts.append(f"db={int(db)}")
    if url.password:
        parts.append(f"password={url.password}")
    if url.scheme == "rediss":
        parts.append("ssl=true")
    return ",".join(parts)


def open_store(redis_url: str, registry_path: Path) -> FeatureStore:
    """A FeatureStore on `redis_url` with the repo's definitions applied."""
    from feast import FeatureStore, RepoConfig
    from feast.repo_config import RegistryConfig

    registry_path.parent.mkdir(parents=True, exist_ok=True)
    config = RepoConfig(
        project="tickserve",
        provider="local",
        registry=RegistryConfig(registry_type="file", path=str(registry_path)),
        online_store={"type": "redis", "connection_string": feast_connection_string(redis_url)},
        offline_store={"type": "file"},
        entity_key_serialization_version=3,
        repo_path=str(Path(definitions.__file__).parent),
    )
    store = FeatureStore(config=config)
    store.apply(
        [definitions.symbol, definitions.crypto_ohlcv_push, definitions.crypto_ohlcv_features]
    )
    return store


def read_online(store: FeatureStore, symbols: list[str], spec: FeatureSpec) -> pd.DataFrame:
    """Latest features per symbol as the online store serves them.

    Raises:
        OnlineStoreError: Redis failed the read.
    """
    refs = [f"{definitions.FEATURE_VIEW}:{name}" for name in spec.names]
    rows = [{"symbol": s} for s in symbols]
    try:
        return store.get_online_features(features=refs, entity_rows=rows).to_df()
    except redis.RedisError as exc:
        raise OnlineStoreError(f"reading {len(symbols)} symbols failed: {exc}") from exc


# A pending row: (event_ns, the block of feature rows it came in, its index there). A
# plain tuple that keeps the caller's block, since `offer` makes one per symbol on the
# event loop (a dataclass of the row as a list cost several times more there); the
# writer thread reads the values out (`_values`).
_Row = tuple[int, np.ndarray, int]


def _values(row: _Row) -> list[float]:
    return row[1][row[2]].tolist()  # type: ignore[no-any-return]


# Newer event time wins, checked and written in one step on the server: one round trip
# per flush, and no window between the read and the write for another writer (a
# partition's next owner after a rebalance) to slip an older row in, as Feast's own
# read-then-write pipeline leaves. Per key: ARGV holds the serialized Timestamp and
# the features' serialized Values back to back (fixed width). Lua numbers are
# doubles, so seconds and nanos are compared apart, never as one ns count.
_WRITE_NEWER = """
local function varint(s, pos)
  local value, scale = 0, 1
  while true do
    local b = string.byte(s, pos)
    value, pos = value + (b % 128) * scale, pos + 1
    if b < 128 then return value, pos end
    scale = scale * 128
  end
end
local function timestamp(s)  -- google.protobuf.Timestamp: 1 seconds, 2 nanos (varints)
  local seconds, nanos, pos, tag, value = 0, 0, 1, 0, 0
  while pos <= #s do
    tag, pos = varint(s, pos)
    value, pos = varint(s, pos)
    if tag == 8 then seconds = value elseif tag == 16 then nanos = value end
  end
  return seconds, nanos
end
local ts_field, ttl, dedup = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1'
local cell, fields = tonumber(ARGV[4]), {}
for f = 5, #ARGV - 2 * #KEYS do fields[#fields + 1] = ARGV[f] end
local first, written = #ARGV - 2 * #KEYS, 0
local args = {false, ts_field, false}  -- reused: key, stamp and values change per key
for f, name in ipairs(fields) do args[2 * f + 2] = name end
for i, key in ipairs(KEYS) do
  local stamp, values = ARGV[first + 2 * i - 1], ARGV[first + 2 * i]
  local newer = true
  if dedup then
    local stored = redis.call('HGET', key, ts_field)
    if stored then
      local s0, n0 = timestamp(stored)
      local s1, n1 = timestamp(stamp)
      newer = s1 > s0 or (s1 == s0 and n1 > n0)
    end
  end
  if newer then
    args[1], args[3] = key, stamp
    for f = 1, #fields do args[2 * f + 3] = string.sub(values, (f - 1) * cell + 1, f * cell) end
    redis.call('HSET', unpack(args))
    if ttl > 0 then redis.call('EXPIRE', key, ttl) end
    written = written + 1
  end
end
return written
"""


class _RedisRows:
    """Rows written in the layout of Feast's Redis online store, by our own code.

    Feast's `online_write_batch` runs Python per row (protobuf objects, datetimes, a
    dict per row) on the writer thread, whose GIL time the hot path
    waits for, and its newer-timestamp-wins check is a read pipeline then a write
    pipeline. This writes the same hash with the same check, in one script call per
    flush (`_WRITE_NEWER`): key `serialize_entity_key(symbol) + project` (cached per
    symbol), field `mmh3("<view>:<feature>")` per feature holding a serialized
    `Value(double_val=)`, and `_ts:<view>` holding a serialized `Timestamp` at
    microsecond precision (as Feast's datetime conversion leaves it). Keys, field
    names and the Redis client come from Feast's own helpers; `tests/test_online.py`
    compares the bytes with what Feast's write leaves, so a Feast upgrade that
    changes the layout fails there. One script call costs the writer thread less CPU
    than two redis-py pipelines, and Redis a little more (the script's Lua);
    `bench/test_micro.py -k online_write` times the whole flush (docs/architecture.md).
    """

    def __init__(
        self,
        client: Any,
        project: str,
        view_name: str,
        names: tuple[str, ...],
        key_version: int,
        ttl_s: int | None,
        dedup: bool,
    ):
        """Prefer `for_store`."""
        from feast.infra.online_stores.helpers import _mmh3
        from feast.protos.feast.types.Value_pb2 import Value

        self._script = client.register_script(_WRITE_NEWER)
        self._project = project
        self._key_version = key_version
        field = Value.DESCRIPTOR.fields_by_name["double_val"]
        assert field.type == field.TYPE_DOUBLE
        self._double_tag = field.number << 3 | 1  # wire type 1: 64-bit little-endian
        fields = [_mmh3(f"{view_name}:{name}") for name in names]
        self._head = [f"_ts:{view_name}".encode(), ttl_s or 0, int(dedup), 9, *fields]
        self._keys: dict[str, bytes] = {}

    @classmethod
    def for_store(
        cls, store: FeatureStore, view: FeatureView, spec: FeatureSpec
    ) -> _RedisRows | None:
        """Rows for this store's Redis, or None where Feast should write.

        That is where the online store is not Redis, or is a Redis Cluster (one script
        cannot touch keys of different slots there).
        """
        from feast.infra.online_stores.redis import (
            RedisOnlineStore,
            RedisOnlineStoreConfig,
            RedisType,
            _versioned_fv_name,
        )

        config = store.config
        online = store.provider.online_store
        if (
            not isinstance(online, RedisOnlineStore)
            or not isinstance(config.online_store, RedisOnlineStoreConfig)
            or config.online_store.redis_type == RedisType.redis_cluster
        ):
            return None
        return cls(
            online._get_client(config.online_store),
            config.project,
            _versioned_fv_name(view, config),
            spec.names,
            config.entity_key_serialization_version,
            config.online_store.key_ttl_seconds,
            not config.online_store.skip_dedup,
        )

    def _key(self, symbol: str) -> bytes:
        key = self._keys.get(symbol)
        if key is None:
            from feast.infra.online_stores.helpers import _redis_key
            from feast.protos.feast.types.EntityKey_pb2 import EntityKey
            from feast.protos.feast.types.Value_pb2 import Value

            entity = EntityKey(join_keys=["symbol"], entity_values=[Value(string_val=symbol)])
            key = self._keys[symbol] = _redis_key(self._project, entity, self._key_version)
        return key

    def write(self, rows: dict[str, _Row]) -> int:
        """Write the rows newer than what the store holds; returns how many were."""
        from google.protobuf.timestamp_pb2 import Timestamp

        keys = [self._key(symbol) for symbol in rows]
        values = np.array([row[1][row[2]] for row in rows.values()], np.float64)
        n, width = values.shape
        cells = np.empty((n, width, 9), np.uint8)  # per feature: tag, then the double
        cells[:, :, 0] = self._double_tag
        cells[:, :, 1:] = values.astype("<f8").view(np.uint8).reshape(n, width, 8)
        blob, size = cells.tobytes(), width * 9
        args = list(self._head)
        for i, row in enumerate(rows.values()):
            seconds, micros = divmod(row[0] // 1000, 1_000_000)
            args.append(Timestamp(seconds=seconds, nanos=micros * 1000).SerializeToString())
            args.append(blob[i * size : (i + 1) * size])
        return int(self._script(keys=keys, args=args))


class OnlineWriter:
    """Coalesces the latest row per symbol and flushes it to Feast from its own thread.

    `offer` is called by the worker after each micro-batch and only takes a lock and
    updates a dict, so signals never wait for Redis. Writes scale with symbols, not
    ticks. A failed flush is counted, logged, kept and retried with backoff; newer
    rows for the same symbol replace the pending ones (last write wins by event time).
    """

    def __init__(self, store: FeatureStore, spec: FeatureSpec, interval_s: float = 0.05):
        """Prepare a writer; call `start` to run its thread."""
        self._store = store
        self._spec = spec
        self._interval_s = interval_s
        self._pending: dict[str, _Row] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="online-writer", daemon=True)
        self.flushed_rows = 0
        self._view: FeatureView | None = None
        self._redis: _RedisRows | None = None  # set with _view on the first write
        # recent tick-event-time -> visible-in-Redis delays, for benchmarks and /metrics
        self.freshness_ns: deque[int] = deque(maxlen=100_000)

    def start(self) -> OnlineWriter:
        """Start the flushing thread."""
        self._thread.start()
        return self

    def offer(self, symbols: list[str], event_ns: np.ndarray, values: np.ndarray) -> None:
        """Queue the newest row per symbol (rows are in event order within a symbol)."""
        if len(values) != len(symbols):
            raise ValueError(f"{len(symbols)} symbols but {len(values)} rows of values")
        block = np.array(values, np.float64)  # ours: read when the row is written
        stamps = event_ns.tolist()
        with self._lock:
            pending = self._pending
            for i, (symbol, ts) in enumerate(zip(symbols, stamps, strict=True)):
                old = pending.get(symbol)
                if old is None or ts >= old[0]:
                    pending[symbol] = (ts, block, i)
        self._wake.set()

    def _take(self) -> dict[str, _Row]:
        with self._lock:
            rows, self._pending = self._pending, {}
        return rows

    def _restore(self, rows: dict[str, _Row]) -> None:
        with self._lock:
            for symbol, row in rows.items():
                newer = self._pending.get(symbol)
                if newer is None or newer[0] < row[0]:
                    self._pending[symbol] = row

    def flush(self) -> None:
        """Write everything pending now; raises if the store fails (rows are kept).

        Raises:
            OnlineStoreError: Redis failed the write.
        """
        rows = self._take()
        if not rows:
            return
        try:
            self._write(rows)
        except redis.RedisError as exc:
            self._restore(rows)
            raise OnlineStoreError(f"writing {len(rows)} rows failed: {exc}") from exc
        except Exception:
            self._restore(rows)
            raise
        now_ns = time.time_ns()
        for row in rows.values():
            delay = max(now_ns - row[0], 0)
            self.freshness_ns.append(delay)
            ONLINE_FRESHNESS.observe(delay / 1e9)
        ONLINE_WRITES.inc(len(rows))
        self.flushed_rows += len(rows)

    def _write(self, rows: dict[str, _Row]) -> None:
        """Write the rows in Feast's Redis layout (or through Feast for another store)."""
        self._feature_view()  # resolved once: the view, and whether the store is Redis
        if self._redis is not None:
            self._redis.write(rows)
        else:
            self._write_through_feast(rows)

    def _feature_view(self) -> FeatureView:
        """The feature view, resolved once, with whether the store is Redis."""
        if self._view is None:
            self._view = self._store.get_feature_view(definitions.FEATURE_VIEW)
            self._redis = _RedisRows.for_store(self._store, self._view, self._spec)
        return self._view

    def _write_through_feast(self, rows: dict[str, _Row]) -> None:
        """Hand protobuf rows to the Feast provider's online write.

        This is the call `FeatureStore.write_to_online_store` ends in, minus its
        DataFrame -> Arrow -> protobuf conversion, which costs more CPU per row than
        the write itself; the write (and its newer-timestamp-wins check) is Feast's own.
        """
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        names = self._spec.names
        data: list[tuple[EntityKey, dict[str, Value], datetime, datetime | None]] = []
        for symbol, row in rows.items():
            key = EntityKey(join_keys=["symbol"], entity_values=[Value(string_val=symbol)])
            values = {n: Value(double_val=v) for n, v in zip(names, _values(row), strict=True)}
            # protobuf Timestamps carry ns, but Feast converts through a datetime (us)
            when = EPOCH + timedelta(microseconds=row[0] // 1000)
            data.append((key, values, when, None))
        view = self._feature_view()
        self._store.provider.online_write_batch(self._store.config, view, data, None)

    def _run(self) -> None:
        backoff = self._interval_s
        while not self._stop.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            try:
                self.flush()
                backoff = self._interval_s
            except Exception as exc:  # any store failure: keep serving, retry later
                ONLINE_FAILURES.inc()
                logger.warning("online store write failed, retrying", extra={"error": str(exc)})
                backoff = min(backoff * 2, 5.0)
                self._stop.wait(backoff)
                self._wake.set()
                continue
            self._stop.wait(self._interval_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread after a last flush attempt."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        try:
            self.flush()
        except Exception as exc:
            ONLINE_FAILURES.inc()
            logger.warning("final online store flush failed", extra={"error": str(exc)})
