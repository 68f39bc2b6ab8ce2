"""The hot path's Kafka data plane: Fetch and Produce on connections of our own.

aiokafka stays the control plane, through its public API: group membership,
assignment, rebalance callbacks, starting positions, offset commits and the rare
sends (dead letters, shadow scores). On the
data path aiokafka's fetcher and sender build and decode request structs field by
field in Python, with a future and a timeout per request and a sender task woken per
batch: in a do-nothing echo worker that alone cost more CPU per tick than the
worker's whole budget (docs/architecture.md has the figures). Here a fetch is one
pre-laid request, its response is walked per partition (`stream.kafka.protocol`) and the record
batches are parsed as columns by `stream.kafka.recordbatch`'s Numba kernels; a produce is the
prebuilt record batches of `stream.kafka.signalbatch` behind a ~40-byte request header.

Protocol: each connection first asks the broker's ApiVersions and settles on the
highest Fetch (4..18) and Produce (3..13) versions both sides speak; the messages
themselves are `stream.kafka.protocol`'s, and a broker with no version in common is
`BrokerIncompatible` (docs/architecture.md says why these ranges). Connections are
opened with TLS and a SASL login as the clients' `KafkaSecurity` says
(`stream.kafka.transport`); leaders and broker addresses come from Metadata requests
of its own (`stream.kafka.metadata`). `wire=False` runs the worker on aiokafka's own
data path (`stream.kafka.aiokafka_io`: `getmany` and `send_batch`).

Responses on one connection come back in request order (the protocol guarantees
it), so a deque of futures is the whole correlation table. Fetches and produces use
separate connections: a broker answers a connection's requests in order, and a
fetch may be parked there for `fetch_max_wait_ms`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import struct
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    NotLeaderForPartitionError,
    OffsetOutOfRangeError,
    for_code,
)
from numba import njit
from prometheus_client import Counter

from stream.kafka import protocol, transport
from stream.kafka.fetched import Fetched, FetchedParts, GapRetries, parse_records
from stream.kafka.metadata import Leaders
from stream.kafka.protocol import (
    API_VERSIONS,
    FETCH,
    PRODUCE,
    SUPPORTED,
    UNSUPPORTED_VERSION,
    Versions,
    parse_fetch_response,
    parse_produce_response,
)
from stream.kafka.recordbatch import (
    HEADER_SIZE,
    N_COLUMNS,
    batch_bounds,
    first_bad_crc,
    parse_into,
    read_be,
)
from stream.kafka.security import PLAINTEXT, KafkaSecurity
from stream.kafka.topic_ids import STALE_ID_ERRORS, StaleTopicId, TopicIds

logger = logging.getLogger(__name__)

CLIENT_ID = b"tickserve"
PRODUCE_RETRIES = 5
RETRY_BACKOFF_S = 0.1
REQUEST_TIMEOUT_MS = 30_000
NEGOTIATE_TIMEOUT_S = 10.0  # a broker that never answers ApiVersions: dial again

WIRE_RETRIES = Counter("wire_retries_total", "Produce or fetch rounds retried", ["api", "error"])
POSITION_RESETS = Counter(
    "consumer_position_resets_total",
    "Fetch positions moved by the reset policy: out of range, or the topic recreated",
    ["reason"],
)

_FRAME = struct.Struct(">ii")  # response size, correlation id
_HEADER = struct.Struct(">ihhih")  # size, api_key, api_version, correlation_id, client_id length


class Connection(asyncio.Protocol):
    """One broker connection: framed requests out, responses matched in order.

    Requests made in one turn of the event loop leave in one write, at the end of the
    turn: a loopback TCP write is costly (the receiving side of the stack runs in the
    writer's syscall), so a worker's Produce and its next Fetch share one (see
    `WireProducer`'s `share`). A broker answers a connection's requests in order, one
    at a time, so a request that may wait there (`parks`: a Fetch) is written after
    the others of its turn: a Produce never queues behind a Fetch of the same write.
    """

    def __init__(self, address: str) -> None:
        """Not connected yet: use `Connection.open`."""
        self.address = address
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiting: deque[tuple[int, asyncio.Future[bytes], bool]] = deque()
        self._pending: list[tuple[bool, int, asyncio.Future[bytes], list[bytes]]] = []
        self._parked = 0  # requests written that may wait at the broker, not yet answered
        self._next_id = 0
        self._error: Exception | None = None
        self._loop = asyncio.get_running_loop()
        self._lost = self._loop.create_future()
        self.versions: Versions | None = None  # settled by `negotiate`
        self.ranges: dict[int, tuple[int, int]] = {}  # the broker's, per api (`negotiate`)

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        security: KafkaSecurity = PLAINTEXT,
        ours: Mapping[int, tuple[int, int]] = SUPPORTED,
    ) -> Connection:
        """Connect with TLS and a SASL login as `security` says, then settle the versions.

        Raises:
            KafkaConnectionError: Nothing answered, or not in time (retriable).
            BrokerAuthError: The TLS handshake or the login was refused (not retriable).
            BrokerIncompatible: The broker speaks no Fetch or Produce version of `ours`.
        """
        conn = await transport.open_connection(cls, host, port, security)
        try:
            await asyncio.wait_for(conn.negotiate(ours), NEGOTIATE_TIMEOUT_S)
        except TimeoutError as exc:
            await conn.close()
            what = f"{conn.address}: no ApiVersions answer within {NEGOTIATE_TIMEOUT_S:g} s"
            raise KafkaConnectionError(what) from exc
        except BaseException:
            await conn.close()
            raise
        return conn

    async def negotiate(self, ours: Mapping[int, tuple[int, int]] = SUPPORTED) -> Versions:
        """Ask the broker's ApiVersions (v3, else v0) and keep the versions settled on."""
        version = protocol.API_VERSIONS_VERSION
        request = protocol.api_versions_request
        body = await self.request(API_VERSIONS, version, [request(version)])
        error, ranges = protocol.parse_api_versions_response(body, version)
        if error == UNSUPPORTED_VERSION:  # an older broker: v0 is the one every broker reads
            version = 0
            body = await self.request(API_VERSIONS, version, [request(version)])
            error, ranges = protocol.parse_api_versions_response(body, version)
        if error:
            raise for_code(error)(f"{self.address}: ApiVersions refused")
        self.ranges = ranges
        self.versions = protocol.negotiate(ranges, ours, self.address)
        logger.info(
            "kafka versions settled",
            extra={
                "broker": self.address,
                "fetch": self.versions.fetch,
                "produce": self.versions.produce,
            },
        )
        return self.versions

    @property
    def settled(self) -> Versions:
        """The versions `negotiate` settled on (every connection from `open` has them)."""
        if self.versions is None:
            raise KafkaError(f"{self.address}: no versions negotiated")
        return self.versions

    @property
    def alive(self) -> bool:
        """Connected and not failed."""
        return self._transport is not None and self._error is None

    @property
    def parked(self) -> bool:
        """A request that may wait at the broker (a Fetch) is written and unanswered.

        A new request would be answered only after it: send it on another connection
        if it must not wait.
        """
        return self._parked > 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # noqa: D102
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
        self._fail(KafkaConnectionError(f"connection to {self.address} lost: {exc}"))
        if not self._lost.done():
            self._lost.set_result(None)

    def data_received(self, data: bytes) -> None:  # noqa: D102
        # usually `data` holds whole responses: they are sliced out of it (one copy);
        # a partial one waits in `_buf` for the rest
        buf = self._buf
        if buf:
            buf += data
        frames: bytes | bytearray = buf if buf else data
        start, have = 0, len(frames)
        while have - start >= 8:
            size, correlation = _FRAME.unpack_from(frames, start)
            end = start + 4 + size
            if have < end:
                break
            if size < 4 or not self._waiting or self._waiting[0][0] != correlation:
                what = f"size {size}, correlation id {correlation}"
                self._fail(KafkaError(f"{self.address}: unexpected response ({what})"))
                return
            _, future, parks = self._waiting.popleft()
            self._parked -= parks
            if not future.done():  # a caller that gave up has cancelled it
                future.set_result(bytes(frames[start + 8 : end]))
            start = end
        if frames is buf:
            del buf[:start]
        elif start < have:
            buf += memoryview(data)[start:]

    def request(
        self, api_key: int, version: int, parts: Sequence[bytes], parks: bool = False
    ) -> asyncio.Future[bytes]:
        """Send one request (its body as `parts`); the future gets the response body.

        `parks`: the broker may hold it (a Fetch waiting for records). It is written
        at the end of this turn of the event loop, after the others made in it that do
        not park.
        """
        future: asyncio.Future[bytes] = self._loop.create_future()
        if not self.alive:
            future.set_exception(self._error or KafkaConnectionError(f"{self.address} closed"))
            return future
        self._next_id = correlation = (self._next_id + 1) & 0x7FFFFFFF
        tags = b"\0" if protocol.is_flexible(api_key, version) else b""  # header v2
        size = _HEADER.size - 4 + len(CLIENT_ID) + len(tags) + sum(len(p) for p in parts)
        header = _HEADER.pack(size, api_key, version, correlation, len(CLIENT_ID)) + CLIENT_ID
        header += tags
        if not self._pending:
            self._loop.call_soon(self._write)
        self._pending.append((parks, correlation, future, [header, *parts]))
        return future

    def _write(self) -> None:
        """Write this turn's requests, those that may wait at the broker last."""
        pending, self._pending = self._pending, []
        if not self.alive:
            return  # `_fail` has failed them
        assert self._transport is not None
        if len(pending) > 1:
            pending.sort(key=lambda request: request[0])  # stable: in order otherwise
        frames = []
        for parks, correlation, future, parts in pending:
            self._waiting.append((correlation, future, parks))
            self._parked += parks
            frames += parts
        self._transport.writelines(frames)

    async def close(self) -> None:
        """Close and wait until the socket is released; requests still waiting fail."""
        self._fail(KafkaConnectionError(f"connection to {self.address} closed"))
        if self._transport is not None:
            self._transport.close()
            await self._lost

    def _fail(self, exc: Exception) -> None:
        self._error = self._error or exc
        failed = [future for _, future, _ in self._waiting]
        failed += [future for _, _, future, _ in self._pending]
        self._waiting.clear()
        self._pending.clear()
        self._parked = 0
        for future in failed:
            if not future.done():
                future.set_exception(exc)
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()


class _Connections:
    """One connection per broker node, opened on first use and again after a failure."""

    def __init__(
        self,
        leaders: Leaders,
        security: KafkaSecurity = PLAINTEXT,
        ours: Mapping[int, tuple[int, int]] = SUPPORTED,
    ) -> None:
        self._leaders = leaders  # where each node listens
        self._security = security
        self._ours = ours  # the versions to settle within
        self._conns: dict[int, Connection] = {}
        self._opening: dict[int, asyncio.Task[Connection]] = {}  # one dial per node at a time
        self._closed = False

    def ready(self, node_id: int) -> Connection | None:
        """The node's connection if it is up (None: `get` dials it)."""
        conn = self._conns.get(node_id)
        return conn if conn is not None and conn.alive else None

    async def get(self, node_id: int) -> Connection:
        if self._closed:
            raise KafkaConnectionError("the wire client is closed")
        conn = self._conns.get(node_id)
        if conn is not None and conn.alive:
            return conn
        opening = self._opening.get(node_id)
        if opening is None:
            broker = self._leaders.broker(node_id)
            if broker is None:
                raise KafkaConnectionError(f"no metadata for broker node {node_id}")
            host, port = broker
            opening = asyncio.ensure_future(Connection.open(host, port, self._security, self._ours))
            self._opening[node_id] = opening
            opening.add_done_callback(functools.partial(self._opened, node_id))
        return await asyncio.shield(opening)  # a caller that gives up leaves the dial alone

    def _opened(self, node_id: int, opening: asyncio.Future[Connection]) -> None:
        """Keep a new connection (here, not in `get`: its caller may have been cancelled)."""
        self._opening.pop(node_id, None)
        if opening.cancelled() or opening.exception() is not None:
            return
        if not self._closed:  # once closed, `close` itself awaits the dial and closes it
            self._conns[node_id] = opening.result()

    async def close(self) -> None:
        self._closed = True
        conns = set(self._conns.values())
        self._conns.clear()
        for opening in list(self._opening.values()):  # a dial in progress: close it too
            with contextlib.suppress(Exception):
                conns.add(await asyncio.shield(opening))
        await asyncio.gather(*(conn.close() for conn in conns))


@njit(cache=True)
def parse_partitions(
    buf: np.ndarray, part_start: np.ndarray, part_end: np.ndarray, fetch_offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every partition's record set of one Fetch response (`buf[part_start[p]:part_end[p]]`).

    One pass over all of them, spans into `buf` itself (no copy, no concatenation).
    Returns (cols: offset, key start/length, value start/length, timestamp rows; the partition
    index of each record; next offset and status per partition, as `parse_batches`
    gives them plus 1 for a set that is not plain v2; the start and end of every
    record batch, for the CRC check).
    """
    n_parts = part_start.shape[0]
    status = np.zeros(n_parts, np.int64)
    next_offsets = fetch_offsets.copy()
    most = buf.shape[0] // HEADER_SIZE + 1
    starts = np.empty(most, np.int64)
    ends = np.empty(most, np.int64)
    first = np.zeros(n_parts + 1, np.int64)  # partition p's batches: first[p]:first[p + 1]
    n_batches = 0
    total = 0
    for p in range(n_parts):
        lo = part_start[p]
        s, e, plain = batch_bounds(buf[lo : part_end[p]])
        if plain != 0:
            status[p] = 1
        else:
            for j in range(s.shape[0]):
                starts[n_batches] = s[j] + lo
                ends[n_batches] = e[j] + lo
                total += read_be(buf, s[j] + lo + 57, 4)
                n_batches += 1
        first[p + 1] = n_batches
    cols = np.empty((N_COLUMNS, total), np.int64)
    part = np.empty(total, np.int64)
    k = 0
    for p in range(n_parts):
        if status[p] != 0:
            continue
        b0, b1 = first[p], first[p + 1]
        before = k
        k, next_offsets[p], status[p] = parse_into(
            buf, starts[b0:b1], ends[b0:b1], fetch_offsets[p], True, cols, k
        )
        part[before:k] = p
    return cols[:, :k], part[:k], next_offsets, status, starts[:n_batches], ends[:n_batches]


def _error(code: int, by_id: bool) -> KafkaError:
    """The aiokafka error for `code`; an unknown id (`by_id`: the request named one) is stale."""
    if by_id and code in STALE_ID_ERRORS:
        return StaleTopicId(f"error {code} for a topic id")
    return for_code(code)()


def _outcome(
    topic: str | bytes,
    version: int,
    batches: list[tuple[int, bytes]],
    response: asyncio.Future[bytes],
) -> tuple[list[tuple[int, bytes]], KafkaError | None]:
    """The batches whose partitions were not acknowledged, and why (None: all were).

    `topic`: its name or id as the request named it; `version`: the request's.
    """
    if response.cancelled():
        return batches, KafkaConnectionError("produce request cancelled")
    exc = response.exception()
    if exc is not None:
        if not isinstance(exc, KafkaError):
            raise exc
        return batches, exc
    errors = parse_produce_response(response.result(), version)
    failed = [(p, d) for p, d in batches if errors.get((topic, p), -1) != 0]
    if not failed:
        return [], None
    partition = failed[0][0]
    code = errors.get((topic, partition), errors.get((protocol.NO_TOPIC_ID, partition), -1))
    by_id = isinstance(topic, bytes)
    return failed, _error(code, by_id) if code >= 0 else KafkaError(f"no ack for {topic!r}")


def settle(ack: asyncio.Future[Any], done: asyncio.Future[Any]) -> None:
    """Pass `done`'s outcome on to `ack`."""
    if ack.done():
        _retrieve(done)
    elif done.cancelled():
        ack.cancel()
    elif done.exception() is not None:
        ack.set_exception(done.exception())  # type: ignore[arg-type]
    else:
        ack.set_result(None)


class WireProducer:
    """Sends prebuilt record batches with one Produce request per leader per call.

    Leaders come from Metadata requests of its own (`stream.kafka.metadata.Leaders`,
    the fetcher's when it shares one). A retriable error (leader moved, timeout,
    connection lost) asks for them again and re-sends the failed partitions, up to
    `PRODUCE_RETRIES` times; like any Kafka producer with more than one request in
    flight and no idempotence, a retry may land after a later request (reordering
    within a partition) and a lost ack may duplicate.

    With `share` (a fetcher), a Produce goes on that fetcher's connection to the
    leader when no Fetch is waiting there (the worker's case: its next Fetch is not
    written yet, and both leave in one write); otherwise on its own connection.
    """

    def __init__(
        self,
        bootstrap: str,
        share: WireFetcher | None = None,
        security: KafkaSecurity = PLAINTEXT,
        versions: Mapping[int, tuple[int, int]] = SUPPORTED,
    ):
        """Produce to the cluster at `bootstrap`, connecting as `security`.

        `versions`: the ranges to settle within with each broker (tests narrow them).
        """
        self._own_leaders = share is None
        self.leaders = Leaders(bootstrap, security, versions) if share is None else share.leaders
        self._conns = _Connections(self.leaders, security, versions)
        self._shared = share._conns if share is not None else None
        self._ids = TopicIds()

    def send(
        self, topic: str, batches: Sequence[tuple[int, bytes, int]]
    ) -> list[asyncio.Future[Any]]:
        """Send (partition, record batch, record count) batches; futures resolve on the acks.

        On a connection that is up, a request and a callback per leader (no task);
        dialling and retries run in a task.
        """
        by_node: dict[int, list[tuple[int, bytes]]] = {}
        for partition, data, _ in batches:
            leader = self.leaders.leader(topic, partition)
            by_node.setdefault(-1 if leader is None else leader, []).append((partition, data))
        acks: list[asyncio.Future[Any]] = []
        for node, part in by_node.items():
            conn = self._ready(node)
            if conn is None or not self._ids.ready(topic, conn.settled.produce):
                acks.append(asyncio.ensure_future(self._produce(topic, node, part)))
                continue
            ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            version, key = self._ids.pick(topic, conn.settled.produce)
            body = protocol.produce_request(version, key, part, REQUEST_TIMEOUT_MS)
            response = conn.request(PRODUCE, version, body)
            response.add_done_callback(
                functools.partial(self._acked, ack, topic, node, part, version, key)
            )
            acks.append(ack)
        return acks

    def _ready(self, node: int) -> Connection | None:
        """A connection to `node` that is up and has no Fetch waiting (None: dial one)."""
        if self._shared is not None:
            conn = self._shared.ready(node)
            if conn is not None and not conn.parked:
                return conn
        return self._conns.ready(node)

    def _acked(
        self,
        ack: asyncio.Future[Any],
        topic: str,
        node: int,
        batches: list[tuple[int, bytes]],
        version: int,
        key: str | bytes,
        response: asyncio.Future[bytes],
    ) -> None:
        if ack.done():
            return  # the caller gave up on it
        failed, exc = _outcome(key, version, batches, response)
        if exc is None:
            ack.set_result(None)
            return
        retry = asyncio.ensure_future(self._produce(topic, node, failed, exc))
        retry.add_done_callback(functools.partial(settle, ack))

    async def _produce(
        self,
        topic: str,
        node: int,
        batches: list[tuple[int, bytes]],
        error: KafkaError | None = None,
    ) -> None:
        """Send, and send again what failed retriably (`error`: the first try failed so)."""
        exc = error
        for attempt in range(PRODUCE_RETRIES + 1):
            if exc is not None:
                if not getattr(exc, "retriable", False) or attempt == PRODUCE_RETRIES:
                    raise exc
                WIRE_RETRIES.labels("produce", type(exc).__name__).inc()
                logger.warning("produce retried", extra={"topic": topic, "error": repr(exc)})
                if isinstance(exc, StaleTopicId):
                    self._ids.forget(topic)
                await asyncio.sleep(RETRY_BACKOFF_S)
            if exc is not None or node < 0:  # leaders unknown yet, or moved
                try:
                    await self.leaders.refresh([topic])
                except KafkaConnectionError as err:
                    exc = err
                    continue
                leader_of = functools.partial(self.leaders.leader, topic)
                leaders = {leader_of(p) for p, _ in batches}
                if len(leaders) > 1:  # the partitions moved apart: one request per leader
                    await asyncio.gather(
                        *(
                            self._produce(
                                topic,
                                -1 if lead is None else lead,
                                [(p, d) for p, d in batches if leader_of(p) == lead],
                            )
                            for lead in leaders
                        )
                    )
                    return
                lead = leaders.pop() if len(leaders) == 1 else None
                node = -1 if lead is None else lead
            try:
                if node < 0:
                    raise NotLeaderForPartitionError(f"no leader known for {topic}")
                conn = await self._conns.get(node)
                await self._ids.resolve(conn, topic, conn.settled.produce)
                version, key = self._ids.pick(topic, conn.settled.produce)
                body = protocol.produce_request(version, key, batches, REQUEST_TIMEOUT_MS)
                response = conn.request(PRODUCE, version, body)
                await asyncio.wait([response])
                batches, exc = _outcome(key, version, batches, response)
            except KafkaError as err:
                exc = err
            if exc is None:
                return

    async def close(self) -> None:
        """Close its own connections (requests in flight fail; shared ones stay open)."""
        await self._conns.close()
        if self._own_leaders:
            await self.leaders.close()


class WireFetcher:
    """Fetches one topic's assigned partitions from positions of its own; aiokafka keeps the group.

    aiokafka's consumer joins the group, runs the rebalance callbacks and commits,
    and the fetcher talks to it through its public API only:
    - the assignment is `consumer.assignment()`, or, once a `ConsumerRebalanceListener`
      passes it on to `revoked` and `assigned`, only what it passes on: nothing is
      fetched from a revoke until `settled` says the new assignment is positioned
      (where the listener restores state and seeks, a fetch from the consumer's
      position before that would hand out records the state is not ready for);
    - every assigned partition is paused (`consumer.pause`), so aiokafka's own fetcher
      stays idle, and `consumer.getmany(timeout_ms=0)` on each round of `poll` returns
      nothing but raises the group's errors, waits out a rebalance and keeps aiokafka's
      `max_poll_interval_ms` watchdog fed, as a consumer that polls does;
    - a partition's first position is `consumer.position` (the committed offset, or the
      reset policy); from there the position is the fetcher's own (`position`, `seek`),
      moved on as records are handed out, and `reset` is applied to it with
      `consumer.seek_to_beginning`/`seek_to_end` when the broker answers "out of range".
    Leaders and broker addresses come from Metadata requests of its own
    (`stream.kafka.metadata.Leaders`). A response whose partition was moved (a seek, a
    new assignment) while it was in flight is dropped. One fetch per leader is kept in
    flight, so the next one is on its way while the caller works on the last.

    The next Fetch leaves at the end of the event loop's turn, in one write with the
    Produce of a `WireProducer(share=this)` made in that turn (one loopback write per
    micro-batch instead of two).
    """

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        topic: str,
        max_wait_ms: int,
        min_bytes: int = 1,
        max_bytes: int = 50 * 1024 * 1024,
        partition_max_bytes: int = 4 * 1024 * 1024,
        gaps: GapRetries | None = None,
        security: KafkaSecurity = PLAINTEXT,
        versions: Mapping[int, tuple[int, int]] = SUPPORTED,
        *,
        bootstrap: str,
        reset: str = "earliest",
    ):
        """Fetch `topic` for `consumer` (started; subscribed, or assigned) from `bootstrap`.

        `reset`: where an out-of-range position goes, "earliest" or "latest" (as the
        consumer's `auto_offset_reset`); `versions`: the ranges to settle within with
        each broker (tests narrow them).
        """
        if reset not in ("earliest", "latest"):
            raise ValueError(f"reset must be 'earliest' or 'latest', not {reset!r}")
        self.consumer = consumer
        self.topic = topic
        self._limits = (max_wait_ms, min_bytes, max_bytes, partition_max_bytes)
        self.gaps = gaps if gaps is not None else GapRetries(limit=0)
        self._reset = reset
        self.leaders = Leaders(bootstrap, security, versions)
        self._conns = _Connections(self.leaders, security, versions)
        self._ids = TopicIds(recreation=True)
        self._seen: frozenset[TopicPartition] | set[TopicPartition] = frozenset()
        self._assigned: frozenset[TopicPartition] = frozenset()  # of `topic`, all paused
        self._grouped = False  # a listener passes the assignment on (`assigned`, `revoked`)
        self._held = False  # revoked, or assigned and not yet `settled`: nothing is fetched
        self._positions: dict[int, int] = {}  # partition -> next offset to fetch
        self._resets: set[int] = set()  # partitions out of range: `reset` before fetching
        self._moves = 0  # counts assignment changes (a position resolved across one is stale)
        self._turn = 0  # fetches sent: where the next one starts in its partition list
        # per leader: the fetch (its response, or the version and response from a dial),
        # its positions and the version it was sent at (None: chosen after the dial)
        self._inflight: dict[int, tuple[asyncio.Future[Any], dict[int, int], int | None]] = {}
        self._ready: deque[tuple[dict[int, int], int, bytes]] = deque()

    def position(self, tp: TopicPartition) -> int | None:
        """The next offset to fetch from `tp` (None: not resolved yet)."""
        return self._positions.get(tp.partition) if tp in self._assigned else None

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Fetch `tp` from `offset` on (the consumer's position moves too)."""
        self.consumer.seek(tp, offset)  # raises IllegalStateError if not assigned
        self._adopt(self.consumer.assignment())
        self._positions[tp.partition] = offset
        self._resets.discard(tp.partition)

    def forget(self, tp: TopicPartition) -> None:
        """Resolve `tp`'s position again (`consumer.position`) before fetching it."""
        self._positions.pop(tp.partition, None)

    def revoked(self, partitions: set[TopicPartition]) -> None:
        """A rebalance takes `partitions` away: stop fetching them (call before committing)."""
        self._grouped = self._held = True
        self._drop({tp for tp in partitions if tp.topic == self.topic})

    def assigned(self, partitions: set[TopicPartition]) -> None:
        """The group's new assignment (call before anything seeks in it).

        Nothing is fetched until `settled`: the caller positions the partitions first.
        """
        self._grouped = self._held = True
        self._adopt(partitions)

    def settled(self) -> None:
        """The new assignment is positioned: fetch it (positions not set are resolved)."""
        self._held = False

    def _adopt(self, assignment: frozenset[TopicPartition] | set[TopicPartition]) -> None:
        self._seen = assignment
        mine = frozenset(tp for tp in assignment if tp.topic == self.topic)
        if mine == self._assigned:
            return
        new = mine - self._assigned
        if new:
            self.consumer.pause(*new)  # aiokafka's fetcher leaves them to us
        self._drop(self._assigned - mine)
        self._assigned = mine

    def _drop(self, partitions: set[TopicPartition] | frozenset[TopicPartition]) -> None:
        if not partitions:
            return
        self._moves += 1
        self._assigned -= partitions
        for tp in partitions:
            self._positions.pop(tp.partition, None)
            self._resets.discard(tp.partition)

    async def poll(self, timeout_ms: int) -> Fetched:
        """Records fetched since the last call (waiting up to `timeout_ms`), as columns."""
        consumer = self.consumer
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_ms / 1000
        # kept across rounds: a round without records still brings high watermarks
        parts = FetchedParts()
        while True:
            # every partition of ours is paused: this returns no records of them; it
            # raises the group's errors, waits out a rebalance and feeds the watchdog
            await consumer.getmany(timeout_ms=0)
            assignment = consumer.assignment()
            if assignment is not self._seen and not self._grouped:
                self._adopt(assignment)
            if len(self._positions) < len(self._assigned) and not self._held:
                await self._resolve(deadline)
            while self._ready:  # positions advance here, before the next fetch is sent
                self._take(*self._ready.popleft(), parts)
            if not self._held:
                self._send_fetches()
            if parts.cols or parts.next_offsets:
                return parts.build(self.topic)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return parts.build(self.topic)
            if not self._inflight:  # no position yet, or no leader known yet
                await asyncio.sleep(min(remaining, 0.01))
                continue
            await self._first_response(loop, deadline)
            self._collect()

    async def _resolve(self, deadline: float) -> None:
        """Positions of assigned partitions that have none: the consumer's, after a reset."""
        moves = self._moves
        for tp in sorted(self._assigned):
            if tp.partition in self._positions:
                continue
            remaining = max(deadline - asyncio.get_running_loop().time(), 0.01)
            try:
                async with asyncio.timeout(remaining):
                    if tp.partition in self._resets:
                        if self._reset == "earliest":
                            await self.consumer.seek_to_beginning(tp)
                        else:
                            await self.consumer.seek_to_end(tp)
                    offset = await self.consumer.position(tp)
            except TimeoutError:
                return  # aiokafka is still resolving it (a first join): next round
            if moves != self._moves or tp not in self._assigned or tp.partition in self._positions:
                return  # the assignment moved meanwhile, or a seek set it: next round
            self._positions[tp.partition] = offset
            self._resets.discard(tp.partition)

    def _send_fetches(self) -> None:
        """A fetch for every leader that has none in flight, its partitions in turn first.

        A broker fills a response in the order the request lists the partitions, up to
        the request's byte limit (KIP-74; Tansu 0.6 also ignores the per-partition
        limit), so a fixed order leaves the last partitions of a backlog waiting behind
        the first ones: each request starts one partition further on, as the Java
        client's and aiokafka's fetchers vary it too.
        """
        by_node: dict[int, list[tuple[int, int]]] = {}
        for partition, offset in self._positions.items():
            if partition in self._resets:
                continue
            leader = self.leaders.leader(self.topic, partition)
            if leader is None:
                self.leaders.refresh_soon([self.topic])
            elif leader not in self._inflight:
                by_node.setdefault(leader, []).append((partition, offset))
        for node, positions in by_node.items():
            self._turn += 1
            positions = rotated(positions, self._turn)
            conn = self._conns.ready(node)
            future: asyncio.Future[Any]
            version: int | None = None
            if conn is not None and self._ids.ready(self.topic, conn.settled.fetch):
                version, key = self._ids.pick(self.topic, conn.settled.fetch)
                body = protocol.fetch_request(version, key, positions, *self._limits)
                future = conn.request(FETCH, version, [body], parks=True)
            else:
                future = asyncio.ensure_future(self._fetch(node, positions))
            future.add_done_callback(_retrieve)
            self._inflight[node] = (future, dict(positions), version)

    async def _first_response(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        """Until a fetch in flight completes or `deadline` (asyncio.wait, minus its tasks)."""
        waiter = loop.create_future()

        def wake(_: object = None) -> None:
            if not waiter.done():
                waiter.set_result(None)

        futures = [f for f, _, _ in self._inflight.values()]
        for future in futures:
            future.add_done_callback(wake)
        timer = loop.call_at(deadline, wake)
        try:
            await waiter
        finally:
            timer.cancel()
            for future in futures:
                future.remove_done_callback(wake)

    async def _fetch(self, node: int, positions: list[tuple[int, int]]) -> tuple[int, bytes]:
        """Dial `node`, learn the topic's id if the version needs it, fetch: (version, body)."""
        conn = await self._conns.get(node)
        try:
            await self._ids.resolve(conn, self.topic, conn.settled.fetch)
        except StaleTopicId:
            await asyncio.sleep(RETRY_BACKOFF_S)  # deleted, maybe not created again yet
            raise
        version, key = self._ids.pick(self.topic, conn.settled.fetch)
        body = protocol.fetch_request(version, key, positions, *self._limits)
        return version, await conn.request(FETCH, version, [body], parks=True)

    def _collect(self) -> None:
        """Move finished fetches to the ready queue; failed ones are sent again next round."""
        for node, (future, positions, version) in list(self._inflight.items()):
            if not future.done():
                continue
            del self._inflight[node]
            if self._ids.recreated(self.topic):
                self._reset_all("topic recreated")  # this answer is for the old positions
                continue
            exc = future.exception()
            if exc is None:
                if version is None:  # a dial's `_fetch`
                    version, body = future.result()
                else:
                    body = future.result()
                self._ready.append((positions, version, body))
            elif isinstance(exc, KafkaError):
                WIRE_RETRIES.labels("fetch", type(exc).__name__).inc()
                logger.warning("fetch failed", extra={"node": node, "error": repr(exc)})
                self.leaders.refresh_soon([self.topic])
            else:
                raise exc

    def _take(
        self, requested_at: dict[int, int], version: int, body: bytes, parts: FetchedParts
    ) -> None:
        """Parse one response into `parts` and move the positions past it."""
        taken = []  # (tp, requested offset, records span) of partitions still wanted
        error, fetched = parse_fetch_response(body, version)
        if error:
            self._fetch_error(error)
            return
        positions = self._positions
        for topic, data in fetched:
            requested = requested_at.get(data.partition)
            if (
                not self._ids.matches(self.topic, topic)
                or requested is None
                or positions.get(data.partition) != requested
            ):
                continue  # moved while the fetch was in flight: fetched again from there
            tp = TopicPartition(self.topic, data.partition)
            if data.error:
                self._partition_error(tp, _error(data.error, isinstance(topic, bytes)))
            else:
                parts.high_watermarks[tp] = data.high_watermark
                taken.append((tp, requested, data))
        if not taken:
            return
        buf = np.frombuffer(body, np.uint8)
        cols, part, next_offsets, status, starts, ends = parse_partitions(
            buf,
            np.array([t[2].start for t in taken], np.int64),
            np.array([t[2].end for t in taken], np.int64),
            np.array([t[1] for t in taken], np.int64),
        )
        if status.any() or first_bad_crc(buf, starts, ends) >= 0:
            self._take_each(taken, body, parts)  # gaps, compression, damage: the careful path
            return
        if cols.shape[1]:
            numbers = np.array([t[0].partition for t in taken], np.int32)
            parts.add_columns(body, numbers[part], cols)
        for (tp, requested, _), next_offset in zip(taken, next_offsets.tolist(), strict=True):
            self.gaps.passed(tp)
            if next_offset != requested:
                positions[tp.partition] = next_offset
                parts.next_offsets[tp] = next_offset

    def _take_each(self, taken: list[tuple[Any, ...]], body: bytes, parts: FetchedParts) -> None:
        """Partition by partition, through `stream.kafka.fetched.parse_records`.

        That path retries gaps, reads anything but plain v2 batches with aiokafka's
        record reader and raises on a CRC mismatch.
        """
        for tp, requested, data in taken:
            raw, cols, next_offset = parse_records(
                tp, body[data.start : data.end], requested, self.gaps
            )
            if len(cols[0]):
                parts.add(tp, raw, cols)
            if next_offset != requested:
                self._positions[tp.partition] = next_offset
                parts.next_offsets[tp] = next_offset

    def _fetch_error(self, code: int) -> None:
        """A whole response refused (top-level error, v7+): retried if retriable."""
        exc = for_code(code)()
        if not exc.retriable:
            raise exc
        WIRE_RETRIES.labels("fetch", type(exc).__name__).inc()
        self.leaders.refresh_soon([self.topic])

    def _partition_error(self, tp: TopicPartition, exc: KafkaError) -> None:
        if isinstance(exc, StaleTopicId):
            self._ids.forget(self.topic)
        if isinstance(exc, OffsetOutOfRangeError):
            # as aiokafka does: the consumer's reset policy, applied before the next fetch
            logger.warning(
                "offset out of range", extra={"partition": tp.partition, "reset": self._reset}
            )
            POSITION_RESETS.labels("out_of_range").inc()
            self._positions.pop(tp.partition, None)
            self._resets.add(tp.partition)
            return
        if not exc.retriable:
            raise exc
        WIRE_RETRIES.labels("fetch", type(exc).__name__).inc()
        if getattr(exc, "invalid_metadata", False):
            self.leaders.refresh_soon([self.topic])

    def _reset_all(self, why: str) -> None:
        """Every assigned partition's position goes by the reset policy before the next fetch.

        A recreated topic's log starts again at 0: positions in the old one would wait
        (silently) for the new log to grow past them and lose what comes before.
        """
        partitions = sorted(tp.partition for tp in self._assigned)
        logger.warning(
            "fetch positions reset",
            extra={"topic": self.topic, "why": why, "reset": self._reset, "partitions": partitions},
        )
        POSITION_RESETS.labels(why.replace(" ", "_")).inc(len(partitions))
        for partition in partitions:
            self._positions.pop(partition, None)
            self._resets.add(partition)

    async def close(self) -> None:
        """Close the fetch connections and the metadata connection."""
        for future, _, _ in self._inflight.values():
            future.cancel()
        await self._conns.close()
        await self.leaders.close()
        self._inflight.clear()
        self._ready.clear()


def rotated(positions: list[tuple[int, int]], turn: int) -> list[tuple[int, int]]:
    """`positions` starting at item `turn` (modulo their number).

    >>> rotated([(0, 5), (1, 7), (2, 9)], 4)
    [(1, 7), (2, 9), (0, 5)]
    """
    k = turn % len(positions)
    return positions[k:] + positions[:k]


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a dropped request's error as seen (it is handled, or moot, where it matters)."""
    if not future.cancelled():
        future.exception()


# one v2 record batch (offset 0, key b"k", value b"v"), for `warm_up`
_WARM_UP_BATCH = bytes.fromhex(
    "00000000000000000000003affffffff026f484c2300000000000000000000000000010000000000000001"
    "ffffffffffffffffffffffffffff0000000110000000026b027600"
)


def warm_up() -> None:
    """Load (or compile) the response parser now, before the first fetch."""
    buf = np.frombuffer(_WARM_UP_BATCH, np.uint8)
    one = np.zeros(1, np.int64)
    *_, starts, ends = parse_partitions(buf, one, one + len(buf), one)
    if first_bad_crc(buf, starts, ends) >= 0:
        raise AssertionError("the warm-up batch is damaged")
