"""Partition leaders and broker addresses for the wire data path, from Metadata requests of its own.

The wire client must know which broker leads each partition and where that broker
listens. aiokafka keeps both in its private cluster metadata; `Leaders` asks the
broker itself instead: one Metadata request (v1..12, the highest version both sides
speak) on a connection of its own, opened as `KafkaSecurity` says, to a broker it
has learnt of or else to a bootstrap server. It asks again when a request finds a
leader unknown or moved (`refresh_soon`), at most once per `REFRESH_BACKOFF_S`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from aiokafka.errors import KafkaConnectionError, KafkaError

from stream.kafka import protocol
from stream.kafka.protocol import METADATA, SUPPORTED
from stream.kafka.security import PLAINTEXT, KafkaSecurity

if TYPE_CHECKING:
    from stream.kafka.wire import Connection

logger = logging.getLogger(__name__)

REFRESH_BACKOFF_S = 0.1  # between two Metadata requests that a failure asked for
REQUEST_TIMEOUT_S = 30.0


def bootstrap_servers(bootstrap: str) -> list[tuple[str, int]]:
    """(host, port) of each server of a bootstrap list.

    >>> bootstrap_servers("a:9092, [::1]:9093")
    [('a', 9092), ('::1', 9093)]
    """
    servers = []
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        servers.append((host.strip("[]"), int(port)))
    return servers


class Leaders:
    """Each watched topic's partition leaders and every broker's address, as the brokers say."""

    def __init__(
        self,
        bootstrap: str,
        security: KafkaSecurity = PLAINTEXT,
        ours: Mapping[int, tuple[int, int]] = SUPPORTED,
    ) -> None:
        """Ask `bootstrap` first; `ours`: the Fetch/Produce ranges each connection settles."""
        self._bootstrap = bootstrap_servers(bootstrap)
        self._security = security
        self._ours = ours
        self._brokers: dict[int, tuple[str, int]] = {}
        self._leaders: dict[str, dict[int, int]] = {}
        self._ids: dict[str, bytes] = {}  # topic ids (KIP-516) the last answers gave
        self._topics: set[str] = set()
        self._conn: Connection | None = None
        self._asking: asyncio.Task[frozenset[str]] | None = None
        self._last_ask = 0.0

    def leader(self, topic: str, partition: int) -> int | None:
        """The node leading `partition` of `topic` (None: not known, or no leader now)."""
        leader = self._leaders.get(topic, {}).get(partition, -1)
        return leader if leader >= 0 else None

    def topic_id(self, topic: str) -> bytes | None:
        """`topic`'s id in the last answer that named it (None: none given, or not known)."""
        return self._ids.get(topic)

    def broker(self, node: int) -> tuple[str, int] | None:
        """Where `node` listens (None: not known)."""
        return self._brokers.get(node)

    async def refresh(self, topics: Iterable[str] = ()) -> None:
        """Ask now (`topics` join those watched); returns once an answer covers them.

        Raises:
            KafkaConnectionError: No broker answered, or `close` was called meanwhile.
            BrokerAuthError: A broker refused the TLS handshake or the login.
        """
        wanted = set(topics)
        self._topics |= wanted
        while True:
            if self._asking is None or self._asking.done():
                self._asking = asyncio.ensure_future(self._ask())
            try:
                asked = await asyncio.shield(self._asking)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # our caller was cancelled
                # `close` cancelled the request: a callback in a group rebalance that
                # cancellation would escape (aiokafka logs an Exception and goes on)
                raise KafkaConnectionError("metadata client closed") from None
            if wanted <= asked:
                return

    def refresh_soon(self, topics: Iterable[str] = ()) -> None:
        """Ask again in the background unless a request is on its way or was just answered."""
        self._topics |= set(topics)
        busy = self._asking is not None and not self._asking.done()
        if busy or time.monotonic() - self._last_ask < REFRESH_BACKOFF_S:
            return
        self._asking = asyncio.ensure_future(self._ask())
        self._asking.add_done_callback(_seen)

    async def _ask(self) -> frozenset[str]:
        self._last_ask = time.monotonic()
        topics = frozenset(self._topics)
        try:
            conn = await self._connection()
            version = protocol.metadata_version(conn.ranges)
            request = protocol.metadata_request(sorted(topics), version)
            response = conn.request(METADATA, version, [request])
            body = await asyncio.wait_for(response, REQUEST_TIMEOUT_S)
        except (KafkaError, TimeoutError) as exc:
            if self._conn is not None:
                await self._conn.close()
                self._conn = None
            if isinstance(exc, KafkaError):
                raise
            raise KafkaConnectionError("no Metadata answer within 30 s") from exc
        brokers, found = protocol.parse_metadata(body, version)
        if brokers:
            self._brokers = brokers
        for topic in found:
            if topic.error == 0:
                self._leaders[topic.name] = topic.leaders
                if topic.topic_id != protocol.NO_TOPIC_ID:
                    self._ids[topic.name] = topic.topic_id
            else:  # unknown, or no leader yet: asked again when a request needs it
                self._leaders.pop(topic.name, None)
                self._ids.pop(topic.name, None)
                logger.info("no leaders for topic", extra={"topic": topic.name})
        return topics

    async def _connection(self) -> Connection:
        """The metadata connection: to a broker learnt before, else a bootstrap server."""
        from stream.kafka.wire import Connection

        if self._conn is not None and self._conn.alive:
            return self._conn
        last: Exception | None = None
        for host, port in [*self._brokers.values(), *self._bootstrap]:
            try:
                self._conn = await Connection.open(host, port, self._security, self._ours)
                return self._conn
            except KafkaConnectionError as exc:
                last = exc
        raise KafkaConnectionError(f"no broker answered a Metadata request: {last}")

    async def close(self) -> None:
        """Close the metadata connection (a request on its way fails)."""
        if self._asking is not None:
            self._asking.cancel()
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


def _seen(task: asyncio.Future[frozenset[str]]) -> None:
    """A background refresh's failure is logged; the caller asks again when it needs to."""
    if not task.cancelled() and task.exception() is not None:
        logger.warning("metadata refresh failed", extra={"error": repr(task.exception())})
