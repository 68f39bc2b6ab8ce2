"""Kafka clients configured for this job (and for the local broker's known defects).

Every factory takes the process's `KafkaSecurity` (TLS, SASL); PLAINTEXT by default.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError

from stream.kafka import transport
from stream.kafka.security import PLAINTEXT, KafkaSecurity
from tickserve.errors import BrokerError, BrokerUnavailable

logger = logging.getLogger(__name__)
MAX_PARTITION_FETCH_BYTES = 4 * 1024 * 1024


def make_producer(
    bootstrap: str, linger_ms: int = 5, security: KafkaSecurity = PLAINTEXT
) -> AIOKafkaProducer:
    """A producer for ticks/signals: acks=all, no idempotence (Tansu rejects InitProducerId)."""
    return AIOKafkaProducer(
        **security.aiokafka_kwargs(),
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=linger_ms,
        enable_idempotence=False,
        max_batch_size=256 * 1024,
        request_timeout_ms=30_000,
    )


def make_consumer(
    bootstrap: str,
    group_id: str,
    topics: list[str],
    fetch_max_wait_ms: int = 20,
    max_batch: int = 2000,
    listener: ConsumerRebalanceListener | None = None,
    security: KafkaSecurity = PLAINTEXT,
) -> AIOKafkaConsumer:
    """A group consumer with manual commits; reads from the earliest offset when new."""
    consumer = AIOKafkaConsumer(
        **security.aiokafka_kwargs(),
        bootstrap_servers=bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=fetch_max_wait_ms,
        max_poll_records=max_batch,
        max_partition_fetch_bytes=MAX_PARTITION_FETCH_BYTES,
    )
    consumer.subscribe(topics, listener=listener)
    return consumer


@contextmanager
def _quiet_bootstrap() -> Iterator[None]:
    """Aiokafka logs a failed bootstrap at ERROR before raising; we report it ourselves."""
    aiokafka_logger = logging.getLogger("aiokafka")
    level = aiokafka_logger.level
    aiokafka_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        aiokafka_logger.setLevel(level)


async def start_client(
    client: AIOKafkaConsumer | AIOKafkaProducer | AIOKafkaAdminClient,
    bootstrap: str,
    security: KafkaSecurity = PLAINTEXT,
) -> None:
    """Start a client, turning 'no broker there' or 'refused us' into one clear error.

    Raises:
        BrokerUnavailable: Nothing answered at `bootstrap`.
        BrokerAuthError: The broker refused the TLS handshake or the SASL login.
    """
    try:
        with _quiet_bootstrap():
            await client.start()
    except KafkaConnectionError as exc:
        await client.close() if isinstance(client, AIOKafkaAdminClient) else await client.stop()
        if security.protocol != "PLAINTEXT":  # aiokafka logged why; find out ourselves
            await transport.diagnose(bootstrap, security)
        raise BrokerUnavailable(bootstrap, str(exc)) from exc


async def ensure_topics(
    bootstrap: str, topics: list[str], partitions: int, security: KafkaSecurity = PLAINTEXT
) -> None:
    """Create topics that do not exist yet (the partition count matters for keyed order).

    Raises:
        BrokerUnavailable: Nothing answered at `bootstrap`.
        BrokerAuthError: The broker refused the TLS handshake or the SASL login.
        BrokerError: The broker failed to list or create the topics.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **security.aiokafka_kwargs())
    await start_client(admin, bootstrap, security)
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            with suppress(TopicAlreadyExistsError):  # another process won the race
                await admin.create_topics(
                    [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in missing]
                )
    except KafkaError as exc:
        raise BrokerError(f"creating topics {topics} failed: {exc}") from exc
    finally:
        await admin.close()


async def wait_assigned(consumer: AIOKafkaConsumer, timeout_s: float = 60.0) -> None:
    """Wait until the group coordinator has assigned partitions (a first join can take seconds).

    Raises:
        BrokerError: No partition was assigned within `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    while not consumer.assignment():
        if time.monotonic() > deadline:
            topics = sorted(consumer.subscription())
            raise BrokerError(f"no partitions of {topics} assigned within {timeout_s:.0f} s")
        await asyncio.sleep(0.05)  # aiokafka joins the group in a background task
