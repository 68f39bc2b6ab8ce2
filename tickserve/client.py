"""Signals for strategies: an async iterator over typed signals from the signals topic.

    from tickserve.client import SignalsConfig, signals

    config = SignalsConfig("broker:9092", group_id="my-strategy")
    async with aclosing(signals(config)) as stream:
        async for signal in stream:
            if signal.score is not None:
                trade(signal.symbol, signal.direction)

Delivery from the worker is at-least-once: a signal repeated after a worker crash has
the same (partition, offset) of its tick, and this iterator drops it. With a group,
offsets are committed for what was handed out, when the next batch is asked for and
when the iterator is closed (`contextlib.aclosing`); what was not is delivered again.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from stream.contracts.signal import Signal
from stream.kafka.clients import start_client
from tickserve.errors import UnsupportedSchema

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SignalsConfig:
    """Where signals come from and which of them to hand out.

    Attributes:
        bootstrap: Kafka bootstrap servers, host:port[,host:port].
        group_id: Consumer group (offsets committed, partitions shared with the group's
            other members); None: read every partition, commit nothing.
        topic: The signals topic.
        start: Where a group with no committed offset (or a consumer without a group)
            starts: "latest" (new signals only) or "earliest" (the whole topic).
        symbols: Only these symbols (None: all).
        versions: Only signals scored by these model versions (None: all).
        ready_only: Skip signals without a score (features not ready, or a model error).
        consumer_options: More keyword arguments for `AIOKafkaConsumer`, e.g. the TLS
            and SASL settings of a secured cluster.
    """

    bootstrap: str
    group_id: str | None = None
    topic: str = "signals"
    start: Literal["earliest", "latest"] = "latest"
    symbols: frozenset[str] | None = None
    versions: frozenset[str] | None = None
    ready_only: bool = False
    consumer_options: Mapping[str, Any] = field(default_factory=dict)


class Repeats:
    """Drops signals whose tick was already answered (a worker's redelivery after a crash).

    The worker writes a tick partition's signals in offset order, so a signal whose
    tick offset is not above the highest seen for its tick partition is a repeat.
    """

    def __init__(self) -> None:
        """Nothing seen yet."""
        self._highest: dict[int, int] = {}
        self.dropped = 0

    def first_time(self, signal: Signal) -> bool:
        """True the first time a tick's signal is seen (always for a pre-1.0 signal)."""
        if signal.offset < 0:
            return True
        if signal.offset <= self._highest.get(signal.partition, -1):
            self.dropped += 1
            return False
        self._highest[signal.partition] = signal.offset
        return True


def wanted(config: SignalsConfig, signal: Signal) -> bool:
    """Whether `signal` passes the config's filters."""
    if config.symbols is not None and signal.symbol not in config.symbols:
        return False
    if config.versions is not None and signal.version not in config.versions:
        return False
    return not (config.ready_only and signal.score is None)


async def signals(config: SignalsConfig) -> AsyncIterator[Signal]:
    """Signals in arrival order (per symbol: tick order), repeats dropped, filters applied.

    Close it (`contextlib.aclosing`) to commit what it handed out and leave the group.
    A record that is not a signal this version can read (a newer major schema, or not
    JSON at all) is logged and skipped, never raised: one bad record must not stop a
    strategy.

    Raises:
        BrokerUnavailable: Nothing answered at `config.bootstrap`.
    """
    consumer = AIOKafkaConsumer(
        config.topic,
        bootstrap_servers=config.bootstrap,
        group_id=config.group_id,
        enable_auto_commit=False,  # aiokafka would commit records fetched but not yet handed out
        auto_offset_reset=config.start,
        **config.consumer_options,
    )
    await start_client(consumer, config.bootstrap)
    repeats = Repeats()
    handed: dict[TopicPartition, int] = {}  # next offset per partition, past what was handed out
    try:
        while True:
            if handed and config.group_id is not None:
                await consumer.commit(handed)  # everything before was handed out
                handed = {}
            batches = await consumer.getmany(timeout_ms=1000)
            for tp, records in batches.items():
                for record in records:
                    handed[tp] = record.offset + 1
                    signal = _decoded(record)
                    if signal and repeats.first_time(signal) and wanted(config, signal):
                        yield signal
    finally:
        if handed and config.group_id is not None:
            with suppress(KafkaError):  # leaving anyway: the group redelivers what is left
                await consumer.commit(handed)
        await consumer.stop()


def _decoded(record: Any) -> Signal | None:
    """The record's signal, or None (logged) for one this version cannot read."""
    try:
        return Signal.decode(record.value)
    except (UnsupportedSchema, ValueError, TypeError) as exc:
        where = {"partition": record.partition, "offset": record.offset}
        logger.warning("unreadable signal skipped", extra={**where, "error": str(exc)})
        return None
