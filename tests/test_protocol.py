"""`stream.kafka.protocol`: our bytes against kio's (Kafka's message specs compiled to
Python) at every version we implement, and the version negotiation."""

from __future__ import annotations

import datetime
import importlib
import io
import uuid
from types import ModuleType
from typing import Any

import pytest
from kio.schema.errors import ErrorCode
from kio.serial import entity_reader, entity_writer

from stream.kafka import protocol
from stream.kafka.protocol import (
    FETCH,
    METADATA,
    PRODUCE,
    SUPPORTED,
    Versions,
    negotiate,
)
from tests.helpers import record_batch as _batch
from tickserve.errors import BrokerIncompatible

FETCH_VERSIONS = range(SUPPORTED[FETCH][0], SUPPORTED[FETCH][1] + 1)
PRODUCE_VERSIONS = range(SUPPORTED[PRODUCE][0], SUPPORTED[PRODUCE][1] + 1)
TOPIC_ID = uuid.UUID("6ba7b810-9dad-11d1-80b4-00c04fd430c8")
MS = datetime.timedelta(milliseconds=1)


def _schema(api: str, version: int, kind: str) -> ModuleType:
    return importlib.import_module(f"kio.schema.{api}.v{version}.{kind}")


def _make(cls: type, **values: Any) -> Any:
    """`cls(**values)`, minus the fields this version of it does not have."""
    fields = cls.__dataclass_fields__  # type: ignore[attr-defined]
    return cls(**{name: value for name, value in values.items() if name in fields})


def _encode(entity: Any) -> bytes:
    buf = io.BytesIO()
    entity_writer(type(entity))(buf, entity)
    return buf.getvalue()


def _topic(version: int) -> str | bytes:
    return TOPIC_ID.bytes if version >= protocol.TOPIC_IDS_FROM else "ticks"


def _response_header(api: int, version: int) -> bytes:
    """What `Connection` hands a parser ahead of the body: the header's tagged fields."""
    return b"\0" if protocol.is_flexible(api, version) else b""


@pytest.mark.parametrize("version", FETCH_VERSIONS)
def test_fetch_request_is_kios(version: int) -> None:
    positions = [(0, 5), (2, 1 << 40)]
    ours = protocol.fetch_request(version, _topic(version), positions, 20, 1, 1 << 20, 4096)
    m = _schema("fetch", version, "request")
    partitions = tuple(
        _make(m.FetchPartition, partition=p, fetch_offset=o, partition_max_bytes=4096)
        for p, o in positions
    )
    topic = _make(m.FetchTopic, topic="ticks", topic_id=TOPIC_ID, partitions=partitions)
    theirs = _make(
        m.FetchRequest,
        replica_id=-1,
        max_wait=20 * MS,
        min_bytes=1,
        max_bytes=1 << 20,
        isolation_level=0,
        topics=(topic,),
        forgotten_topics_data=(),
    )
    assert ours == _encode(theirs)


@pytest.mark.parametrize("version", FETCH_VERSIONS)
def test_fetch_response_walk_reads_kios_response(version: int) -> None:
    m = _schema("fetch", version, "response")
    records = [_batch(3, 7), b"", None]
    aborted = (_make(m.AbortedTransaction, producer_id=9, first_offset=2),)
    extra: dict[str, Any] = {  # tagged fields (v12+) the walk must step over
        "diverging_epoch": m.EpochEndOffset(epoch=3, end_offset=40)
        if hasattr(m, "EpochEndOffset")
        else None,
        "current_leader": m.LeaderIdAndEpoch(leader_id=2, leader_epoch=5)
        if hasattr(m, "LeaderIdAndEpoch")
        else None,
        "preferred_read_replica": 1,
    }
    partitions = tuple(
        _make(
            m.PartitionData,
            partition_index=index,
            error_code=ErrorCode(error),
            high_watermark=high,
            last_stable_offset=high,
            aborted_transactions=txns,
            records=data,
            **{k: v for k, v in extra.items() if v is not None},
        )
        for index, error, high, txns, data in [
            (0, 0, 10, (), records[0]),
            (1, 1, 4, aborted, records[1]),
            (2, 0, 0, None, records[2]),
        ]
    )
    topic = _make(m.FetchableTopicResponse, topic="ticks", topic_id=TOPIC_ID, partitions=partitions)
    endpoints = (m.NodeEndpoint(node_id=2, host="b2", port=9092),) if version >= 16 else ()
    response = _make(
        m.FetchResponse,
        throttle_time=0 * MS,
        error_code=ErrorCode(0),
        responses=(topic,),
        node_endpoints=endpoints,
    )
    body = _response_header(FETCH, version) + _encode(response)
    error, parsed = protocol.parse_fetch_response(body, version)
    assert error == 0
    assert [(t, d.partition, d.error, d.high_watermark) for t, d in parsed] == [
        (_topic(version), 0, 0, 10),
        (_topic(version), 1, 1, 4),
        (_topic(version), 2, 0, 0),
    ]
    assert [body[d.start : d.end] for _, d in parsed] == [records[0], b"", b""]


def test_fetch_response_top_level_error_is_returned() -> None:
    m = _schema("fetch", 12, "response")
    response = m.FetchResponse(throttle_time=0 * MS, error_code=ErrorCode(70), responses=())
    assert protocol.parse_fetch_response(b"\0" + _encode(response), 12) == (70, [])


@pytest.mark.parametrize("version", PRODUCE_VERSIONS)
def test_produce_request_is_kios_and_its_response_is_read(version: int) -> None:
    a, b, c = _batch(2, 0), _batch(1, 0), _batch(4, 0)
    topic_key = TOPIC_ID.bytes if version >= protocol.TOPIC_IDS_FROM else "signals"
    ours = b"".join(protocol.produce_request(version, topic_key, [(1, a), (3, b), (1, c)], 30_000))
    m = _schema("produce", version, "request")
    partitions = (
        m.PartitionProduceData(index=1, records=a + c),
        m.PartitionProduceData(index=3, records=b),
    )
    topic = _make(m.TopicProduceData, name="signals", topic_id=TOPIC_ID, partition_data=partitions)
    theirs = m.ProduceRequest(
        transactional_id=None, acks=-1, timeout=30_000 * MS, topic_data=(topic,)
    )
    assert ours == _encode(theirs)

    r = _schema("produce", version, "response")
    record_errors = (
        (r.BatchIndexAndErrorMessage(batch_index=0, batch_index_error_message="bad"),)
        if hasattr(r, "BatchIndexAndErrorMessage")
        else ()
    )
    failed = _make(
        r.PartitionProduceResponse,
        index=3,
        error_code=ErrorCode(6),
        base_offset=-1,
        log_append_time=None,
        record_errors=record_errors,
        error_message="not the leader",
        **(
            {"current_leader": r.LeaderIdAndEpoch(leader_id=2, leader_epoch=1)}
            if hasattr(r, "LeaderIdAndEpoch")
            else {}
        ),
    )
    ok = _make(
        r.PartitionProduceResponse,
        index=1,
        error_code=ErrorCode(0),
        base_offset=40,
        log_append_time=None,
        record_errors=(),
    )
    response = _make(
        r.ProduceResponse,
        responses=(
            _make(
                r.TopicProduceResponse,
                name="signals",
                topic_id=TOPIC_ID,
                partition_responses=(ok, failed),
            ),
        ),
        throttle_time=0 * MS,
    )
    body = _response_header(PRODUCE, version) + _encode(response)
    assert protocol.parse_produce_response(body, version) == {(topic_key, 1): 0, (topic_key, 3): 6}


@pytest.mark.parametrize("version", [0, 3])
def test_api_versions_request_and_response_are_kios(version: int) -> None:
    m = _schema("api_versions", version, "request")
    theirs = _make(
        m.ApiVersionsRequest, client_software_name="tickserve", client_software_version="0.1.0"
    )
    assert protocol.api_versions_request(version) == _encode(theirs)
    r = _schema("api_versions", version, "response")
    keys = tuple(
        r.ApiVersion(api_key=k, min_version=lo, max_version=hi)
        for k, (lo, hi) in [(0, (3, 13)), (1, (4, 18)), (18, (0, 4))]
    )
    response = _make(
        r.ApiVersionsResponse, error_code=ErrorCode(0), api_keys=keys, throttle_time=0 * MS
    )
    assert protocol.parse_api_versions_response(_encode(response), version) == (
        0,
        {0: (3, 13), 1: (4, 18), 18: (0, 4)},
    )


def test_api_versions_refusal_is_read_in_the_v0_layout() -> None:
    r = _schema("api_versions", 0, "response")
    refusal = r.ApiVersionsResponse(
        error_code=ErrorCode(35), api_keys=(r.ApiVersion(api_key=18, min_version=0, max_version=2),)
    )
    assert protocol.parse_api_versions_response(_encode(refusal), 3) == (35, {})


@pytest.mark.parametrize("version", range(protocol.METADATA_FROM, SUPPORTED[METADATA][1] + 1))
def test_metadata_request_is_kios_and_its_leaders_and_topic_ids_are_read(version: int) -> None:
    """Every version the leaders' client (`stream.kafka.metadata`) may settle on."""
    m = _schema("metadata", version, "request")
    theirs = _make(
        m.MetadataRequest,
        topics=(_make(m.MetadataRequestTopic, topic_id=uuid.UUID(int=0), name="ticks"),),
        allow_auto_topic_creation=False,
        include_cluster_authorized_operations=False,
        include_topic_authorized_operations=False,
    )
    assert protocol.metadata_request(["ticks"], version) == _encode(theirs)
    r = _schema("metadata", version, "response")
    partitions = tuple(
        _make(
            r.MetadataResponsePartition,
            error_code=ErrorCode(0),
            partition_index=p,
            leader_id=p % 2,
            leader_epoch=3,
            replica_nodes=(0, 1),
            isr_nodes=(1,),
            offline_replicas=(),
        )
        for p in range(3)
    )
    response = _make(
        r.MetadataResponse,
        throttle_time=0 * MS,
        brokers=(
            _make(r.MetadataResponseBroker, node_id=0, host="b0", port=9092, rack="r1"),
            _make(r.MetadataResponseBroker, node_id=1, host="b1", port=9093, rack=None),
        ),
        cluster_id="c",
        controller_id=0,
        topics=(
            _make(
                r.MetadataResponseTopic,
                error_code=ErrorCode(0),
                name="ticks",
                topic_id=TOPIC_ID,
                is_internal=False,
                partitions=partitions,
                topic_authorized_operations=-2147483648,
            ),
            _make(
                r.MetadataResponseTopic,
                error_code=ErrorCode(3),
                name="gone",
                topic_id=uuid.UUID(int=0),
                is_internal=False,
                partitions=(),
                topic_authorized_operations=-2147483648,
            ),
        ),
        cluster_authorized_operations=-2147483648,
    )
    body = _response_header(METADATA, version) + _encode(response)
    brokers, topics = protocol.parse_metadata(body, version)
    assert brokers == {0: ("b0", 9092), 1: ("b1", 9093)}
    ticks_id = TOPIC_ID.bytes if version >= 10 else bytes(16)
    assert topics == [
        protocol.TopicMetadata("ticks", 0, ticks_id, {0: 0, 1: 1, 2: 0}),
        protocol.TopicMetadata("gone", 3, bytes(16), {}),
    ]
    assert protocol.parse_metadata_response(body, version) == topics


def test_kio_reads_our_flexible_fetch_request_back() -> None:
    """A second reference: kio's reader parses our v17 request to the same fields."""
    m = _schema("fetch", 17, "request")
    ours = protocol.fetch_request(17, TOPIC_ID.bytes, [(3, 99)], 20, 1, 1 << 20, 4096)
    parsed, size = entity_reader(m.FetchRequest)(ours, 0)
    assert size == len(ours)
    assert parsed.topics[0].topic_id == TOPIC_ID
    assert parsed.topics[0].partitions[0].fetch_offset == 99
    assert parsed.max_wait == 20 * MS


# --- negotiation ------------------------------------------------------------------------

KAFKA_4_0 = {
    PRODUCE: (0, 12),
    FETCH: (4, 17),
    METADATA: (0, 13),
}  # Produce listed from 0: KAFKA-18659
KAFKA_4_1 = {PRODUCE: (0, 13), FETCH: (4, 18), METADATA: (0, 13)}
TANSU_0_6 = {PRODUCE: (0, 11), FETCH: (0, 17), METADATA: (0, 12)}
KAFKA_2_0 = {PRODUCE: (0, 6), FETCH: (0, 8), METADATA: (0, 6)}


@pytest.mark.parametrize(
    ("broker", "expected"),
    [
        (KAFKA_4_0, Versions(fetch=17, produce=12, metadata=12)),
        (KAFKA_4_1, Versions(fetch=18, produce=13, metadata=12)),
        (TANSU_0_6, Versions(fetch=17, produce=11, metadata=12)),
        (KAFKA_2_0, Versions(fetch=8, produce=6, metadata=None)),  # no topic ids there
        ({PRODUCE: (3, 3), FETCH: (4, 4), METADATA: (0, 9)}, Versions(4, 3, None)),
    ],
)
def test_negotiation_takes_the_highest_common_version(
    broker: dict[int, tuple[int, int]], expected: Versions
) -> None:
    assert negotiate(broker) == expected


@pytest.mark.parametrize(
    ("broker", "message"),
    [
        (
            {PRODUCE: (0, 13), FETCH: (19, 25), METADATA: (0, 13)},
            "b:9092 serves Fetch versions 19..25, tickserve implements 4..18: no version in common",
        ),
        (
            {PRODUCE: (0, 2), FETCH: (0, 17)},
            "b:9092 serves Produce versions 0..2, tickserve implements 3..13",
        ),
        ({FETCH: (4, 17)}, "b:9092 serves Produce no version, tickserve implements 3..13"),
    ],
)
def test_no_common_version_is_one_clear_error(
    broker: dict[int, tuple[int, int]], message: str
) -> None:
    with pytest.raises(BrokerIncompatible, match=message.replace(".", r"\.")) as raised:
        negotiate(broker, address="b:9092")
    assert str(raised.value).startswith("broker: b:9092 serves")
    assert "\n" not in str(raised.value)
