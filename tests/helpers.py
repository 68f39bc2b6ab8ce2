"""Helpers and constants shared by the tests (test modules import from here, never each other)."""

from __future__ import annotations

import ast
import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from deploy.settings import Settings
from stream.kafka.clients import ensure_topics
from training.train import TrainResult

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "freqtrade"
TRADES = DATA / "XRP_ETH-trades.parquet"

# ticks of TRADES the session pipeline publishes, archives and trains on
HISTORY = 8000

# a valid tick as the tick contract reads it, received at NOW
NOW = 1_700_000_000_000_000_000
GOOD = {
    "symbol": "BTC/USDT",
    "event_ns": NOW - 1000,
    "price": 60000.01,
    "quantity": 0.5,
    "side": "buy",
    "trade_id": "42",
    "recv_ns": NOW,
}

# partitions of the topics the fetch and wire tests produce `records` to
PARTITIONS = 3


def unique(prefix: str) -> str:
    """A fresh topic or group name, so tests never see each other's records."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def run(coro: object) -> object:
    """asyncio.run for helpers called from synchronous tests."""
    return asyncio.run(coro)  # type: ignore[arg-type]


def fresh(settings: Settings, **update: Any) -> Settings:
    """`settings` with topics and a group of their own (created), plus `update`."""
    fresh = settings.model_copy(
        update={
            "ticks_topic": unique("ticks"),
            "signals_topic": unique("signals"),
            "dlq_topic": unique("dlq"),
            "group_id": unique("worker"),
            **update,
        }
    )
    topics = [fresh.ticks_topic, fresh.signals_topic, fresh.dlq_topic]
    run(ensure_topics(fresh.bootstrap, topics, fresh.partitions))
    return fresh


@dataclass
class Pipeline:
    """What the session `pipeline` fixture set up: topics, a registered model, the ticks."""

    settings: Settings
    result: TrainResult
    ticks: list[dict[str, object]]


class LoopThread:
    """Runs a coroutine on its own event loop in a thread (a worker beside the test)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def submit(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def tickserve(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the `tickserve` command line in a child process with only `env`'s settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TICKSERVE_", "MLFLOW_"))}
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args],
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def error_lines(done: subprocess.CompletedProcess[str]) -> list[str]:
    """stderr lines that are not JSON log records."""
    return [line for line in done.stderr.splitlines() if not line.startswith("{")]


async def read_topic(
    bootstrap: str,
    topic: str,
    partitions: int,
    expected: int,
    timeout_s: float = 60.0,
    done: Callable[[list[ConsumerRecord[bytes, bytes]]], bool] | None = None,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of `topic` from offset 0 until `expected` arrived (or the timeout).

    With `done`, reads until it returns True for the records so far instead.
    Returns what arrived; the caller asserts on the count, so a stall fails loudly.
    """
    finished = done or (lambda records: len(records) >= expected)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20
    )
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        parts = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        deadline = time.monotonic() + timeout_s
        while not finished(records) and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            for msgs in batches.values():
                records.extend(msgs)
        # a short grace period catches duplicates that would arrive after the count
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            for msgs in (await consumer.getmany(timeout_ms=100)).values():
                records.extend(msgs)
    finally:
        await consumer.stop()
    return records


def mixed_records(n: int, seed: int) -> list[tuple[bytes | None, bytes | None, int]]:
    """(key, value, partition): null keys and values, empty ones, a few large values."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        key = None if i % 17 == 0 and i % 29 else f"k{i % 23}".encode()
        if i % 29 == 0:
            value = None
        elif i % 31 == 0:
            value = b""
        else:
            value = bytes(rng.integers(0, 256, int(rng.integers(1, 300 if i % 97 else 5000))))
        out.append((key, value, i % PARTITIONS))
    return out


async def produce_records(
    bootstrap: str, topic: str, records: list, compression: str | None
) -> None:
    """Send (key, value, partition) records with aiokafka's producer, every fifth with a header."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=5, acks="all", compression_type=compression
    )
    await producer.start()
    try:
        futures = [
            await producer.send(
                topic, value, key=key, partition=p, headers=[("h", b"x")] if i % 5 == 0 else []
            )
            for i, (key, value, p) in enumerate(records)
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def record_batch(n: int, base: int) -> bytes:
    """A v2 record batch of `n` records built by aiokafka, with base offset `base`."""
    builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1 << 20)
    for i in range(n):
        builder.append(i, timestamp=1000 + i, key=b"k", value=f"v{base + i}".encode(), headers=[])
    raw = bytearray(builder.build())
    raw[0:8] = base.to_bytes(8, "big")  # the broker assigns the base offset
    return bytes(raw)


def forbidden_imports(path: Path) -> list[str]:
    """What the module at `path` imports from test modules or the conftest (all should be here)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            names = [f"{module}.{alias.name}".replace("..", ".") for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.lstrip(".").split(".")
            if parts[0] == "tests":
                parts = parts[1:]
            if parts and (parts[0].startswith("test_") or parts[0] == "conftest"):
                found.append(name)
    return found


# metric families served but not tickserve's own (prometheus_client's process and
# runtime collectors, Feast's feature server): docs/metrics.md does not list them
LIBRARY_METRICS = ("process_", "python_", "feast_")


@dataclass(frozen=True)
class MetricRow:
    """One row of docs/metrics.md's table."""

    type: str
    labels: frozenset[str]
    help: str


def metrics_table() -> dict[str, MetricRow]:
    """docs/metrics.md's table: exposed name (counters with `_total`) -> its row."""
    rows: dict[str, MetricRow] = {}
    for line in (ROOT / "docs" / "metrics.md").read_text().splitlines():
        if not line.startswith("| `"):
            continue
        name, kind, labels, help_text = (cell.strip() for cell in line.strip("|").split("|"))
        names = frozenset(label.strip() for label in labels.split(",") if label.strip())
        rows[name.strip("`")] = MetricRow(kind, names, help_text)
    return rows


def table_mismatches(families: object) -> list[str]:
    """How Prometheus metric families (collected or parsed) differ from docs/metrics.md.

    Names, types and help must match both ways; labels are compared where a family
    has samples (a labelled metric with no child yet shows none).
    """
    table = metrics_table()
    seen: set[str] = set()
    wrong: list[str] = []
    for family in families:  # type: ignore[attr-defined]
        name = family.name + ("_total" if family.type == "counter" else "")
        base = name.removesuffix("_created")
        if name.startswith(LIBRARY_METRICS) or (
            base != name and {base, f"{base}_total"} & table.keys()
        ):
            continue  # a library's, or the creation time the text format serves apart
        seen.add(name)
        row = table.get(name)
        if row is None:
            wrong.append(f"{name}: served but not in docs/metrics.md")
            continue
        if (family.type, family.documentation) != (row.type, row.help):
            wrong.append(f"{name}: served as {family.type} {family.documentation!r}, listed {row}")
        labels = {k for s in family.samples for k in s.labels if k != "le"}
        if family.samples and labels != row.labels:
            wrong.append(
                f"{name}: served with labels {sorted(labels)}, listed {sorted(row.labels)}"
            )
    return wrong + [f"{name}: listed but not served" for name in sorted(set(table) - seen)]
