"""Test helpers that read topics back from the real broker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition


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


def run(coro: object) -> object:
    """asyncio.run for helpers called from synchronous tests."""
    return asyncio.run(coro)  # type: ignore[arg-type]
