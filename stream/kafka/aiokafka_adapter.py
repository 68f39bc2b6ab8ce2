"""The one module that leans on aiokafka's private internals: prebuilt batches for `send_batch`.

The data path itself is public API only: `stream.kafka.wire` fetches and produces on
connections of its own, and `stream.kafka.aiokafka_io` (the `TICKSERVE_WIRE=false`
path) reads through `getmany`. One private contract remains, here: `PrebuiltBatch`
hands the worker's finished record batches (`stream.kafka.signalbatch`) to
`AIOKafkaProducer.send_batch` in place of aiokafka's `BatchBuilder`, whose members the
accumulator and sender call (`_build`, `_set_producer_state` among them) are not
documented. The public alternative (`create_batch` and one `append` per record)
would decode and re-encode every signal. tests/test_records.py pins the members
aiokafka calls against its source and sends through it on the real broker, so a
release that changes them fails there; pyproject.toml's aiokafka range is the one
that test has passed on.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.record.util import calc_crc32c

from stream.kafka.recordbatch import (
    ATTRIBUTES_OFFSET,
    CRC_OFFSET,
    PRODUCER_OFFSET,
    PRODUCER_STATE,
)


class PrebuiltBatch:
    """A finished record batch that `AIOKafkaProducer.send_batch` takes in place of its builder.

    aiokafka 0.14's accumulator and sender use a `BatchBuilder` through these
    members only (producer/message_accumulator.py: `MessageBatch`,
    `MessageAccumulator.add_message/flush_for_commit`): `append` (returns None when
    full, so `producer.send()` to the same partition opens a new batch), `close`,
    `closed`, `record_count`, `size`, `_build` (the bytes of the ProduceRequest,
    again on a retry) and `_set_producer_state` (idempotent producers).
    tests/test_records.py pins that list against aiokafka's source.

    The batch is closed from the start, so the sender takes it at once instead of
    letting it linger `linger_ms` for appends that will never come. It carries no
    transactional flag: use it with non-transactional producers only.
    """

    __slots__ = ("_buffer", "_count")

    def __init__(self, data: bytes, record_count: int):
        """Wrap one complete batch, as `encode_signal_batches` returns it."""
        self._buffer = data
        self._count = record_count

    def append(self, *, timestamp: int | None, key: Any, value: Any, headers: Any = ()) -> None:
        """Refuse the record: the batch is full (aiokafka then opens a new one)."""
        return None

    def close(self) -> None:
        """Nothing to do: the batch was closed when it was built."""

    def closed(self) -> bool:
        """Always closed."""
        return True

    def record_count(self) -> int:
        """Records in the batch."""
        return self._count

    def size(self) -> int:
        """Bytes of the batch."""
        return len(self._buffer)

    def _build(self) -> bytes:
        return self._buffer

    def _set_producer_state(
        self, producer_id: int, producer_epoch: int, base_sequence: int
    ) -> None:
        buf = bytearray(self._buffer)
        PRODUCER_STATE.pack_into(buf, PRODUCER_OFFSET, producer_id, producer_epoch, base_sequence)
        struct.pack_into(">I", buf, CRC_OFFSET, calc_crc32c(buf[ATTRIBUTES_OFFSET:]))
        self._buffer = bytes(buf)


async def send_batches(
    producer: AIOKafkaProducer, topic: str, batches: Sequence[tuple[int, bytes, int]]
) -> list[asyncio.Future[Any]]:
    """Queue the batches of `encode_signal_batches`; the futures resolve on the broker's acks.

    Batches of one partition are queued in order (aiokafka keeps one in flight per
    partition, so they land in order).
    """
    return [
        await producer.send_batch(PrebuiltBatch(data, count), topic, partition=p)
        for p, data, count in batches
    ]
