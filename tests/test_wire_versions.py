"""Version negotiation of `stream.kafka.wire`: against stub brokers answering ApiVersions
with chosen ranges, and records through the real local broker at every version."""

from __future__ import annotations

import asyncio
import datetime
import io
import struct
import time
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError
from kio.schema.api_versions.v0.response import ApiVersion as ApiVersionV0
from kio.schema.api_versions.v0.response import ApiVersionsResponse as ApiVersionsResponseV0
from kio.schema.api_versions.v3.response import ApiVersion as ApiVersionV3
from kio.schema.api_versions.v3.response import ApiVersionsResponse as ApiVersionsResponseV3
from kio.schema.errors import ErrorCode
from kio.schema.metadata.v12.response import MetadataResponse, MetadataResponseTopic
from kio.serial import entity_writer

from deploy import cli
from deploy.settings import Settings
from stream.kafka import protocol, wire
from stream.kafka.clients import ensure_topics
from stream.kafka.metadata import Leaders
from stream.kafka.protocol import API_VERSIONS, FETCH, METADATA, PRODUCE, SUPPORTED, Versions
from stream.kafka.topic_ids import TopicIds
from stream.kafka.wire import Connection, WireFetcher, WireProducer
from tests.helpers import produce_records as _produce
from tests.helpers import record_batch as _batch
from tests.helpers import run, unique
from tickserve.errors import BrokerIncompatible

Ranges = dict[int, tuple[int, int]]
_MS = datetime.timedelta(milliseconds=1)


class StubBroker:
    """Answers ApiVersions (v3, or refuses it in the v0 layout) and nothing else."""

    def __init__(self, ranges: Ranges, knows_v3: bool = True, silent: bool = False) -> None:
        self.ranges = {API_VERSIONS: (0, 3 if knows_v3 else 2), **ranges}
        self.knows_v3 = knows_v3
        self.silent = silent  # reads requests, answers none
        self.asked: list[int] = []  # ApiVersions versions received
        self.closed = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (size,) = struct.unpack(">i", await reader.readexactly(4))
                frame = await reader.readexactly(size)
                api, version, correlation = struct.unpack_from(">hhi", frame)
                assert api == API_VERSIONS, f"the stub got api {api}"
                self.asked.append(version)
                if self.silent:
                    continue
                body = self._answer(version)
                writer.write(struct.pack(">ii", len(body) + 4, correlation) + body)
        except asyncio.IncompleteReadError:
            self.closed.set()
        finally:
            writer.close()

    def _answer(self, version: int) -> bytes:
        buf = io.BytesIO()
        if version >= 3 and self.knows_v3:
            keys = tuple(
                ApiVersionV3(api_key=k, min_version=lo, max_version=hi)
                for k, (lo, hi) in self.ranges.items()
            )
            response: Any = ApiVersionsResponseV3(
                error_code=ErrorCode(0), api_keys=keys, throttle_time=0 * _MS
            )
        else:  # v0 layout: the answer to v0, and the refusal of a version it does not know
            error = ErrorCode(0 if version == 0 else protocol.UNSUPPORTED_VERSION)
            keys = tuple(
                ApiVersionV0(api_key=k, min_version=lo, max_version=hi)
                for k, (lo, hi) in self.ranges.items()
            )
            response = ApiVersionsResponseV0(error_code=error, api_keys=keys)
        entity_writer(type(response))(buf, response)
        return buf.getvalue()


async def _negotiate_with(stub: StubBroker) -> tuple[Versions | BrokerIncompatible, str]:
    server = await asyncio.start_server(stub.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        try:
            conn = await asyncio.wait_for(Connection.open("127.0.0.1", port), 10)
        except BrokerIncompatible as exc:
            await asyncio.wait_for(stub.closed.wait(), 10)  # it hung up, too
            return exc, f"127.0.0.1:{port}"
        versions = conn.settled
        await conn.close()
        return versions, f"127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


def test_a_broker_with_no_common_fetch_version_is_one_clear_error() -> None:
    stub = StubBroker({PRODUCE: (0, 11), FETCH: (0, 3), METADATA: (0, 12)})
    error, address = run(_negotiate_with(stub))
    assert isinstance(error, BrokerIncompatible)
    assert str(error) == (
        f"broker: {address} serves Fetch versions 0..3, tickserve implements 4..18:"
        " no version in common"
    )
    assert (error.api, error.ours, error.theirs) == ("Fetch", (4, 18), (0, 3))


def test_a_broker_above_our_produce_range_is_refused() -> None:
    stub = StubBroker({PRODUCE: (14, 20), FETCH: (4, 25), METADATA: (0, 13)})
    error, address = run(_negotiate_with(stub))
    assert isinstance(error, BrokerIncompatible)
    assert f"{address} serves Produce versions 14..20, tickserve implements 3..13" in str(error)


@pytest.mark.parametrize(
    ("ranges", "expected"),
    [
        ({PRODUCE: (3, 7), FETCH: (4, 9), METADATA: (0, 9)}, Versions(9, 7, None)),
        ({PRODUCE: (0, 12), FETCH: (4, 17), METADATA: (0, 13)}, Versions(17, 12, 12)),  # 4.0
        ({PRODUCE: (5, 40), FETCH: (10, 40), METADATA: (10, 11)}, Versions(18, 13, 11)),
        # topic ids need Metadata v10+: without it, the highest versions that take names
        ({PRODUCE: (3, 13), FETCH: (4, 18), METADATA: (0, 9)}, Versions(12, 12, None)),
    ],
)
def test_the_highest_common_version_is_chosen(ranges: Ranges, expected: Versions) -> None:
    stub = StubBroker(ranges)
    versions, _ = run(_negotiate_with(stub))
    assert versions == expected
    assert stub.asked == [3]


def test_a_broker_that_refuses_api_versions_v3_is_asked_v0() -> None:
    stub = StubBroker({PRODUCE: (0, 8), FETCH: (0, 11), METADATA: (0, 9)}, knows_v3=False)
    versions, _ = run(_negotiate_with(stub))
    assert versions == Versions(11, 8, None)
    assert stub.asked == [3, 0]


def test_serve_stops_with_one_line_and_status_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What `tickserve serve` prints when its worker's first connection finds no common version."""

    def serve(settings: Settings, args: object) -> int:
        raise BrokerIncompatible("Fetch", (4, 18), (0, 3), "b:9092")

    monkeypatch.setitem(cli.COMMANDS, "serve", serve)
    assert cli.main(["serve"]) == 2
    assert capsys.readouterr().err == (
        "tickserve serve: error: broker: b:9092 serves Fetch versions 0..3,"
        " tickserve implements 4..18: no version in common\n"
    )


def test_a_broker_that_never_answers_api_versions_is_a_connection_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No hang: the dial fails as a connection error (the data path dials again)."""
    monkeypatch.setattr(wire, "NEGOTIATE_TIMEOUT_S", 0.2)
    stub = StubBroker({PRODUCE: (0, 11), FETCH: (0, 17)}, silent=True)
    with pytest.raises(KafkaConnectionError, match="no ApiVersions answer within 0.2 s"):
        run(_negotiate_with(stub))
    assert stub.asked == [3]


# --- the real local broker --------------------------------------------------------------


def _broker_ranges(bootstrap: str) -> Ranges:
    """The broker's ranges, asked with a plain v0 ApiVersions (not through `negotiate`)."""

    async def ask() -> Ranges:
        host, port = bootstrap.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        header = struct.pack(">hhih", API_VERSIONS, 0, 1, 4) + b"test"
        writer.write(struct.pack(">i", len(header)) + header)
        (size,) = struct.unpack(">i", await reader.readexactly(4))
        body = (await reader.readexactly(size))[4:]
        writer.close()
        error, ranges = protocol.parse_api_versions_response(body, 0)
        assert error == 0
        return ranges

    return run(ask())  # type: ignore[return-value]


def test_the_local_broker_settles_on_flexible_versions(stack_settings: Settings) -> None:
    theirs = _broker_ranges(stack_settings.bootstrap)

    async def go() -> Versions:
        host, port = stack_settings.bootstrap.rsplit(":", 1)
        conn = await Connection.open(host, int(port))
        await conn.close()
        return conn.settled

    versions = run(go())
    assert versions == protocol.negotiate(theirs)
    assert versions.fetch == min(SUPPORTED[FETCH][1], theirs[FETCH][1])
    assert versions.produce == min(SUPPORTED[PRODUCE][1], theirs[PRODUCE][1])
    # Tansu 0.6.0 serves Fetch 0..17, Produce 0..11, Metadata 0..12: flexible, topic ids
    assert versions.fetch >= 13 and versions.produce >= 9 and versions.metadata is not None


def _only(api: int, version: int) -> Ranges:
    return {**SUPPORTED, api: (version, version)}


async def _round_trip(
    bootstrap: str, topic: str, fetch: int, produce: int
) -> tuple[dict[int, list[tuple[int, bytes | None]]], Versions, Versions, tuple[int, Any]]:
    """Records sent by WireProducer at `produce`, read back by WireFetcher at `fetch`."""
    await ensure_topics(bootstrap, [topic], 2)
    wire = WireProducer(bootstrap, versions=_only(PRODUCE, produce))
    try:
        await wire.leaders.refresh([topic])
        for call in range(3):
            batches = [(p, _batch(10, 100 * call + 10 * p), 10) for p in (0, 1)]
            await asyncio.wait_for(asyncio.gather(*wire.send(topic, batches)), 30)
        [produced] = [c.settled for c in wire._conns._conns.values()]
    finally:
        await wire.close()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    fetcher = WireFetcher(consumer, topic, 20, versions=_only(FETCH, fetch), bootstrap=bootstrap)
    got: dict[int, list[tuple[int, bytes | None]]] = {0: [], 1: []}
    try:
        parts = [TopicPartition(topic, p) for p in (0, 1)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        deadline = time.monotonic() + 30
        while sum(map(len, got.values())) < 60 and time.monotonic() < deadline:
            fetched = await fetcher.poll(200)
            for i in range(len(fetched)):
                got[int(fetched.partition[i])].append((int(fetched.offset[i]), fetched.value(i)))
        [fetched_at] = [c.settled for c in fetcher._conns._conns.values()]
        picked = fetcher._ids.pick(topic, fetch)
    finally:
        await fetcher.close()
        await consumer.stop()
    return got, produced, fetched_at, picked


def _expected(partition: int) -> list[tuple[int, bytes | None]]:
    values = [
        f"v{100 * call + 10 * partition + i}".encode() for call in range(3) for i in range(10)
    ]
    return list(enumerate(values))


# each case: one Fetch version and one Produce version, so that together they cover both ranges
CASES = [(fetch, min(fetch - 1, SUPPORTED[PRODUCE][1])) for fetch in range(4, 19)]


@pytest.mark.parametrize(("fetch", "produce"), CASES)
def test_records_round_trip_at_every_version(
    stack_settings: Settings, fetch: int, produce: int
) -> None:
    """At a version the broker serves, the records come back whole; at one it does not, the
    client stops with BrokerIncompatible (no hang, no silent fallback)."""
    theirs = _broker_ranges(stack_settings.bootstrap)
    serves = {
        api: theirs[api][0] <= version <= theirs[api][1]
        for api, version in ((FETCH, fetch), (PRODUCE, produce))
    }
    topic = unique(f"v{fetch}-{produce}")
    if not serves[PRODUCE] or not serves[FETCH]:
        with pytest.raises(BrokerIncompatible, match="no version in common"):
            run(_round_trip(stack_settings.bootstrap, topic, fetch, produce))
        return
    got, produced, fetched_at, picked = run(
        _round_trip(stack_settings.bootstrap, topic, fetch, produce)
    )
    assert produced.produce == produce and fetched_at.fetch == fetch
    assert picked[0] == fetch  # an admin-created topic has an id: v13+ fetches by it
    assert isinstance(picked[1], bytes) == (fetch >= protocol.TOPIC_IDS_FROM)
    assert got == {0: _expected(0), 1: _expected(1)}


class _MetadataOnly:
    """A connection whose broker answers Metadata with one topic, id `topic_id` or error."""

    def __init__(self, topic_id: uuid.UUID, error: int = 0) -> None:
        self.settled = Versions(fetch=17, produce=13, metadata=12)
        self.topic_id, self.error = topic_id, error
        self.asked = 0

    def request(self, api: int, version: int, parts: list[bytes]) -> asyncio.Future[bytes]:
        assert (api, version) == (METADATA, 12)
        self.asked += 1
        topic = MetadataResponseTopic(
            error_code=ErrorCode(self.error), name="t", topic_id=self.topic_id, partitions=()
        )
        response = MetadataResponse(throttle_time=0 * _MS, brokers=(), topics=(topic,))
        buf = io.BytesIO(b"\0")  # the response header's tagged fields
        buf.seek(1)
        entity_writer(MetadataResponse)(buf, response)
        future = asyncio.get_running_loop().create_future()
        future.set_result(buf.getvalue())
        return future


@pytest.mark.parametrize(
    ("topic_id", "error", "picked"),
    [
        (uuid.UUID(int=7), 0, (17, uuid.UUID(int=7).bytes)),
        (uuid.UUID(int=0), 0, (12, "t")),  # a broker that assigns no ids: named, at v12
        (uuid.UUID(int=7), 3, (12, "t")),  # unknown to Metadata (yet): named
    ],
)
def test_topic_ids_come_from_metadata_else_the_topic_is_named(
    topic_id: uuid.UUID, error: int, picked: tuple[int, str | bytes]
) -> None:
    async def go() -> None:
        conn = _MetadataOnly(topic_id, error)
        ids = TopicIds()
        assert ids.ready("t", 12) and not ids.ready("t", 13)
        await ids.resolve(conn, "t", 17)  # type: ignore[arg-type]
        await ids.resolve(conn, "t", 17)  # type: ignore[arg-type]
        assert conn.asked == 1 and ids.ready("t", 17)
        assert ids.pick("t", 17) == picked
        assert ids.pick("t", 11) == (11, "t")
        assert ids.matches("t", "t") and not ids.matches("t", "u")
        # the null id: how Tansu answers an id it does not know (one topic per request)
        assert ids.matches("t", protocol.NO_TOPIC_ID)
        assert ids.matches("t", uuid.UUID(int=7).bytes) == isinstance(picked[1], bytes)
        ids.forget("t")
        await ids.resolve(conn, "t", 17)  # type: ignore[arg-type]
        assert conn.asked == 2

    run(go())


def test_a_topic_made_again_is_fetched_by_its_new_id(stack_settings: Settings) -> None:
    """The topic is deleted and created again under the fetcher: its old id is refused, the
    fetcher asks Metadata again and reads the new log by its new id from the start (the reset
    policy): its position in the old log means nothing in the new one."""
    bootstrap = stack_settings.bootstrap
    topic = unique("again")
    fetch = min(_broker_ranges(bootstrap)[FETCH][1], SUPPORTED[FETCH][1])
    assert fetch >= protocol.TOPIC_IDS_FROM, "the local broker no longer serves Fetch v13+"

    async def read(fetcher: WireFetcher, n: int) -> list[bytes | None]:
        got: list[bytes | None] = []
        deadline = time.monotonic() + 30
        while len(got) < n and time.monotonic() < deadline:
            fetched = await fetcher.poll(200)
            got += [fetched.value(i) for i in range(len(fetched))]
        return got

    async def go() -> tuple[list[bytes | None], list[bytes | None], Any, Any]:
        await ensure_topics(bootstrap, [topic], 1)
        await _produce(bootstrap, topic, [(b"k", b"a%d" % i, 0) for i in range(10)], None)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
        )
        await consumer.start()
        fetcher = WireFetcher(consumer, topic, 20, bootstrap=bootstrap)
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            consumer.assign([TopicPartition(topic, 0)])
            first = await read(fetcher, 10)
            old = fetcher._ids.pick(topic, fetch)
            await admin.delete_topics([topic])
            await admin.create_topics([NewTopic(topic, 1, 1)])
            await _produce(bootstrap, topic, [(b"k", b"b%d" % i, 0) for i in range(15)], None)
            second = await read(fetcher, 15)  # not from offset 10, where the fetcher stood
            return first, second, old, fetcher._ids.pick(topic, fetch)
        finally:
            await admin.close()
            await fetcher.close()
            await consumer.stop()

    first, second, old, new = run(go())
    assert first == [b"a%d" % i for i in range(10)]
    assert second == [b"b%d" % i for i in range(15)]
    assert old[0] == new[0] == fetch
    assert isinstance(old[1], bytes) and isinstance(new[1], bytes) and old[1] != new[1]


def test_a_metadata_request_cut_short_by_close_fails_as_a_connection_error() -> None:
    """As in a rebalance callback that waits for leaders while the worker shuts down.

    aiokafka logs an `Exception` from the callback and finishes the rejoin; a
    `CancelledError` would end its coordination task, and the consumer's `stop` with it.
    """

    async def go() -> None:
        stub = StubBroker({}, silent=True)  # the request waits for ever
        server = await asyncio.start_server(stub.serve, "127.0.0.1", 0)
        leaders = Leaders(f"127.0.0.1:{server.sockets[0].getsockname()[1]}")
        try:
            waiting = asyncio.ensure_future(leaders.refresh(["t"]))
            await asyncio.sleep(0.2)
            await leaders.close()
            with pytest.raises(KafkaConnectionError, match="metadata client closed"):
                await asyncio.wait_for(waiting, 5)
            cancelled = asyncio.ensure_future(leaders.refresh(["t"]))  # its caller cancelled
            await asyncio.sleep(0.2)
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
        finally:
            await leaders.close()
            server.close()
            await server.wait_closed()

    run(go())
