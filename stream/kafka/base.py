"""The data plane as the worker sees it: a tick source and a signal sink.

Three implementations: `stream.kafka.wire_io` (Fetch and Produce on connections of our
own, the default) and `stream.kafka.aiokafka_io` (aiokafka's data path), both with
aiokafka as the control plane (group, assignment, commits, metadata), and
`stream.kafka.confluent_io` (librdkafka's consumer and transactional producer: the
exactly-once option). All connect as `DataPlaneConfig.security` says (TLS, SASL) and
are held to the same contract by tests/test_dataplane_contract.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import TopicPartition

from stream.kafka.fetched import Fetched
from stream.kafka.security import PLAINTEXT, KafkaSecurity

# (partition, record batch, record count), as `stream.kafka.signalbatch` builds them
RecordBatches = Sequence[tuple[int, bytes, int]]
Headers = Sequence[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class DataPlaneConfig:
    """Where a data plane reads and writes, and its client knobs.

    Attributes:
        bootstrap: Kafka bootstrap servers.
        topic: The subscribed topic (ticks).
        group_id: Consumer group; offsets are committed there.
        fetch_max_wait_ms: How long the broker may hold a fetch for records.
        max_batch: Most records a poll hands out (aiokafka's data path).
        linger_ms: The producer's linger for the records sent one by one.
        security: TLS and SASL of every connection, aiokafka's and our own.
        transactional_id: The exactly-once plane's transactional id; "": the group id
            and the host name (`stream.kafka.confluent_io.transactional_id`).
    """

    bootstrap: str
    topic: str
    group_id: str
    fetch_max_wait_ms: int = 20
    max_batch: int = 2000
    linger_ms: int = 5
    security: KafkaSecurity = PLAINTEXT
    transactional_id: str = ""


class Rebalance(Protocol):
    """Who is told when the group moves partitions (between two polls)."""

    async def on_assigned(self, partitions: set[TopicPartition]) -> None:
        """Partitions newly assigned: positions may be moved here (`TickSource.seek`)."""

    async def on_revoked(self, partitions: set[TopicPartition]) -> None:
        """Partitions about to be taken away: commit what is acknowledged now."""


class TickSource(Protocol):
    """The subscribed topic's assigned partitions, as columnar batches, with commits."""

    async def start(self, rebalance: Rebalance) -> None:
        """Connect and join the group; `rebalance` hears of every assignment change."""

    async def wait_assigned(self) -> None:
        """Return once the group has assigned partitions (raises StackError on timeout)."""

    async def poll(self, timeout_ms: int) -> Fetched:
        """Records fetched since the last call (waiting up to `timeout_ms`), as columns.

        Positions move past what is handed out; `Fetched.next_offsets` says where to.
        """

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit these next offsets for the group (raises OffsetCommitFailed)."""

    async def committed(self, tp: TopicPartition) -> int | None:
        """The group's committed offset of `tp`, None if it has none."""

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Read `tp` from `offset` on."""

    async def seek_to_beginning(self, tp: TopicPartition) -> None:
        """Read `tp` from its first offset on."""

    async def log_range(self, tp: TopicPartition) -> tuple[int, int]:
        """The partition's log start offset and its end (high watermark) now."""

    async def log_id(self, topic: str) -> str:
        """`topic`'s id now (KIP-516), as hex; "" where the broker or client gives none.

        A topic deleted and created again, or a broker restarted with empty storage,
        gets another id: offsets remembered from before describe a log that is gone.
        """

    async def close(self) -> None:
        """Leave the group and close the connections."""


class SignalSink(Protocol):
    """Sends prebuilt record batches and single records; futures resolve on the acks."""

    async def start(self) -> None:
        """Connect."""

    async def partitions(self, topic: str) -> int:
        """How many partitions `topic` has."""

    async def send(self, topic: str, batches: RecordBatches) -> list[asyncio.Future[Any]]:
        """Send record batches; batches of one partition land in order."""

    async def send_record(
        self, topic: str, value: bytes | None, key: bytes | None, headers: Headers = ()
    ) -> asyncio.Future[Any]:
        """Send one record (dead letters, shadow scores: off the hot path)."""

    async def close(self) -> None:
        """Flush what is queued and close."""


@dataclass(frozen=True, slots=True)
class DataPlane:
    """A source and a sink made for one another (they may share connections).

    Attributes:
        source: Ticks in, and the group's commits.
        sink: Signals, dead letters and summaries out.
        transactional: Commits are transactions over what the sink sent since the last
            one: they must fall between micro-batches (`CommitTracker.between_batches`).
    """

    source: TickSource
    sink: SignalSink
    transactional: bool = False


# builds a data plane inside the running event loop (aiokafka's clients need one)
OpenDataPlane = Callable[[DataPlaneConfig], DataPlane]
