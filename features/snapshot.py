"""Feature state snapshots: per Kafka partition, with the offset they reflect, kept in Redis."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import redis
from prometheus_client import Counter

from features.engine import FeatureEngine
from tickserve.errors import DataError, OnlineStoreError

logger = logging.getLogger(__name__)

SNAPSHOT_FAILURES = Counter("snapshot_failures_total", "Snapshot writes or reads that failed")
SNAPSHOTS = Counter("snapshots_total", "Partition snapshots written")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """State of some symbols after every record before `next_offset` was applied.

    `log_id` names the log those offsets are in (the topic's id, hex; "" unknown):
    a topic recreated, or a broker restarted with empty storage, reuses the offsets.
    """

    next_offset: int
    spec_hash: str
    symbols: list[str]
    fstate: np.ndarray
    istate: np.ndarray
    rings: np.ndarray
    log_id: str = ""

    def encode(self) -> bytes:
        """Serialize as an .npz (no pickle)."""
        buf = io.BytesIO()
        np.savez(
            buf,
            next_offset=np.int64(self.next_offset),
            spec_hash=np.str_(self.spec_hash),
            symbols=np.array(self.symbols, dtype=np.str_),
            fstate=self.fstate,
            istate=self.istate,
            rings=self.rings,
            log_id=np.str_(self.log_id),
        )
        return buf.getvalue()

    @classmethod
    def decode(cls, blob: bytes) -> Snapshot:
        """Parse `encode`'s output."""
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            return cls(
                int(npz["next_offset"]),
                str(npz["spec_hash"]),
                [str(s) for s in npz["symbols"]],
                npz["fstate"],
                npz["istate"],
                npz["rings"],
                str(npz["log_id"]) if "log_id" in npz.files else "",
            )


def take(
    engine: FeatureEngine, symbols: Iterable[str], next_offset: int, log_id: str = ""
) -> Snapshot:
    """Copy the state of `symbols` out of `engine` (cheap: a few rows per symbol)."""
    names = list(symbols)
    slots = np.array([engine.slot_of[s] for s in names], np.int64)
    return Snapshot(
        next_offset,
        engine.spec.hash,
        names,
        engine.fstate[slots].copy(),
        engine.istate[slots].copy(),
        engine.rings[slots].copy(),
        log_id,
    )


def restore(engine: FeatureEngine, snap: Snapshot) -> None:
    """Put a snapshot's symbols back into `engine`, assigning slots as needed."""
    if snap.spec_hash != engine.spec.hash:
        raise DataError(
            f"snapshot was taken with FeatureSpec {snap.spec_hash}, engine runs {engine.spec.hash}"
        )
    slots = engine.slots(snap.symbols)
    kept = slots >= 0
    if not kept.all():  # max_symbols lowered since the snapshot: its newest symbols replay
        logger.warning(
            "snapshot holds more symbols than max_symbols",
            extra={"dropped": int((~kept).sum()), "max_symbols": engine.max_symbols},
        )
    engine.fstate[slots[kept]] = snap.fstate[kept]
    engine.istate[slots[kept]] = snap.istate[kept]
    engine.rings[slots[kept]] = snap.rings[kept]


def _count_failure(what: str, key: str, exc: redis.RedisError) -> None:
    """Count and log a failed snapshot call as the error it stands for; never raises.

    Snapshots only shorten a replay, so the worker goes on without them.
    """
    error = OnlineStoreError(f"{what}: {exc}", key=key, component="snapshots")
    SNAPSHOT_FAILURES.inc()
    logger.warning(what, extra={"key": key, "error": str(error)})


class SnapshotStore:
    """Snapshots in Redis under `<prefix>:<topic>:<partition>`; writes on a background thread."""

    def __init__(self, redis_url: str, prefix: str):
        """Connect lazily; nothing is sent until the first save or load."""
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self._prefix = prefix
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshots")

    def key(self, topic: str, partition: int) -> str:
        """The Redis key of one partition's snapshot."""
        return f"{self._prefix}:{topic}:{partition}"

    def _write(self, key: str, blob: bytes) -> None:
        try:
            self._redis.set(key, blob)
            SNAPSHOTS.inc()
        except redis.RedisError as exc:
            _count_failure("snapshot write failed", key, exc)

    def save(self, topic: str, partition: int, snap: Snapshot) -> Future[None]:
        """Encode and write in the background; the returned future never raises."""
        return self._pool.submit(self._write, self.key(topic, partition), snap.encode())

    def load(self, topic: str, partition: int) -> Snapshot | None:
        """The partition's latest snapshot, or None (none yet, or Redis unreachable)."""
        key = self.key(topic, partition)
        try:
            blob = self._redis.get(key)
        except redis.RedisError as exc:
            _count_failure("snapshot read failed", key, exc)
            return None
        return Snapshot.decode(blob) if blob else None  # type: ignore[arg-type]

    def close(self) -> None:
        """Finish pending writes."""
        self._pool.shutdown(wait=True)
        self._redis.close()
