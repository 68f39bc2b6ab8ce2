"""Kafka protocol messages of the data path, at every version tickserve speaks.

ApiVersions (the negotiation), Metadata (topic ids, for the versions that name a
topic by its id), Fetch and Produce: request bodies built from a version, response
bodies walked by version. Layouts follow Apache Kafka's message specs
(`clients/src/main/resources/common/message/*.json`): from a message's first
"flexible" version on, strings and arrays are compact (unsigned-varint length + 1),
every struct ends in a tagged-field section, and the request header gains one
(header v2); the response header gains one too (v1), except ApiVersions', which
stays v0 so that any client can read it. Fetch from v13 and Produce from v13 name a
topic by its 16-byte id (KIP-516) instead of its name.

The implemented ranges (`SUPPORTED`) start at the oldest versions Apache Kafka 4.0
still serves (KIP-896: Fetch 4, Produce 3) and end at the newest the 4.x clients
send (Fetch 18, Produce 13); `negotiate` takes the highest version inside both ours
and the broker's, and a broker whose range misses ours is `BrokerIncompatible`.

Record batches (message format v2) are opaque here: `stream.kafka.recordbatch` owns
their layout. A parser gets the response body after the correlation id and returns
where each partition's records lie in it, so they are parsed in place.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tickserve.errors import BrokerIncompatible

PRODUCE, FETCH, METADATA, API_VERSIONS = 0, 1, 3, 18  # api keys
SASL_HANDSHAKE, SASL_AUTHENTICATE = 17, 36  # api keys of a connection's authentication
API_NAMES = {PRODUCE: "Produce", FETCH: "Fetch", METADATA: "Metadata", API_VERSIONS: "ApiVersions"}
# (lowest, highest) version implemented here, per api
SUPPORTED: Mapping[int, tuple[int, int]] = {FETCH: (4, 18), PRODUCE: (3, 13), METADATA: (10, 12)}
NEVER = 1 << 15  # no flexible version
FLEXIBLE_FROM = {
    PRODUCE: 9,
    FETCH: 12,
    METADATA: 9,
    API_VERSIONS: 3,
    SASL_HANDSHAKE: NEVER,
    SASL_AUTHENTICATE: 2,
}
TOPIC_IDS_FROM = 13  # Fetch and Produce both name topics by id from version 13
API_VERSIONS_VERSION = 3  # the first flexible one; v0 is the fallback every broker reads
UNSUPPORTED_VERSION = 35  # error code
CLIENT_SOFTWARE = ("tickserve", "0.1.0")  # ApiVersions v3: shown in the broker's metrics
NO_TOPIC_ID = bytes(16)

_I16, _I32 = struct.Struct(">h"), struct.Struct(">i")
_API_RANGE = struct.Struct(">hhh")  # api key, min version, max version


def is_flexible(api_key: int, version: int) -> bool:
    """Whether `version` of `api_key` uses the compact encoding and a header v2 request.

    An api missing from `FLEXIBLE_FROM` is a KeyError: its header must not be guessed.
    """
    return version >= FLEXIBLE_FROM[api_key]


@dataclass(frozen=True, slots=True)
class Versions:
    """The versions settled on with one broker (`metadata` None: topic ids unavailable)."""

    fetch: int
    produce: int
    metadata: int | None


def negotiate(
    broker: Mapping[int, tuple[int, int]],
    ours: Mapping[int, tuple[int, int]] = SUPPORTED,
    address: str = "the broker",
) -> Versions:
    """The highest version of each data-path api inside both `ours` and `broker`'s ranges.

    Fetch and Produce from v13 need a topic's id, which only Metadata v10+ gives: with
    no Metadata version in common they stay below 13.

    Raises:
        BrokerIncompatible: Fetch or Produce has no version in common (or the broker
            lacks the api).

    >>> negotiate({0: (0, 11), 1: (0, 17), 3: (0, 12)})
    Versions(fetch=17, produce=11, metadata=12)
    >>> negotiate({0: (3, 12), 1: (4, 17), 3: (0, 9)})
    Versions(fetch=12, produce=12, metadata=None)
    """
    metadata = _common(broker, ours, METADATA)
    chosen = {}
    for api in (FETCH, PRODUCE):
        low, high = ours[api]
        if metadata is None:
            high = min(high, TOPIC_IDS_FROM - 1)
        version = _common(broker, {api: (low, high)}, api)
        if version is None:
            raise BrokerIncompatible(API_NAMES[api], ours[api], broker.get(api), address)
        chosen[api] = version
    return Versions(chosen[FETCH], chosen[PRODUCE], metadata)


def metadata_version(broker: Mapping[int, tuple[int, int]], address: str = "the broker") -> int:
    """The Metadata version to ask leaders and brokers at: the highest in both ranges.

    Raises:
        BrokerIncompatible: No Metadata version from `METADATA_FROM` on in common.

    >>> metadata_version({3: (0, 12)}), metadata_version({3: (0, 8)})
    (12, 8)
    """
    ours = (METADATA_FROM, SUPPORTED[METADATA][1])
    version = _common(broker, {METADATA: ours}, METADATA)
    if version is None:
        raise BrokerIncompatible(API_NAMES[METADATA], ours, broker.get(METADATA), address)
    return version


def _common(
    broker: Mapping[int, tuple[int, int]], ours: Mapping[int, tuple[int, int]], api: int
) -> int | None:
    if api not in broker or api not in ours:
        return None
    high = min(ours[api][1], broker[api][1])
    return high if high >= max(ours[api][0], broker[api][0]) else None


# --- primitives -------------------------------------------------------------------------


def uvarint(value: int) -> bytes:
    """An unsigned varint (the compact encodings' lengths and tag counts).

    >>> list(uvarint(1)), list(uvarint(300))
    ([1], [172, 2])
    """
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_uvarint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it) of the unsigned varint at `pos`."""
    byte = buf[pos]
    if byte < 0x80:
        return byte, pos + 1
    value, shift = byte & 0x7F, 7
    while True:
        pos += 1
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos + 1
        shift += 7


def skip_tags(buf: bytes, pos: int) -> int:
    """The position after the tagged-field section at `pos` (its fields are not read)."""
    count = buf[pos]
    if count == 0:
        return pos + 1
    count, pos = read_uvarint(buf, pos)
    for _ in range(count):
        _, pos = read_uvarint(buf, pos)  # tag
        size, pos = read_uvarint(buf, pos)
        pos += size
    return pos


def _string(text: str, flexible: bool) -> bytes:
    raw = text.encode()
    return (uvarint(len(raw) + 1) if flexible else _I16.pack(len(raw))) + raw


def _read_string(buf: bytes, pos: int, flexible: bool) -> tuple[str | None, int]:
    if flexible:
        size, pos = read_uvarint(buf, pos)
        size -= 1
    else:
        (size,) = _I16.unpack_from(buf, pos)
        pos += 2
    if size < 0:
        return None, pos
    return buf[pos : pos + size].decode(), pos + size


def _read_count(buf: bytes, pos: int, flexible: bool) -> tuple[int, int]:
    """An array's length (-1: null) and the position after it."""
    if flexible:
        count, pos = read_uvarint(buf, pos)
        return count - 1, pos
    return _I32.unpack_from(buf, pos)[0], pos + 4


def _count(n: int, flexible: bool) -> bytes:
    return uvarint(n + 1) if flexible else _I32.pack(n)


# --- ApiVersions ------------------------------------------------------------------------


def api_versions_request(version: int) -> bytes:
    """An ApiVersions request body (v3+ names the client software)."""
    if version < API_VERSIONS_VERSION:
        return b""
    name, software_version = CLIENT_SOFTWARE
    return _string(name, True) + _string(software_version, True) + b"\0"


def parse_api_versions_response(
    body: bytes, version: int
) -> tuple[int, dict[int, tuple[int, int]]]:
    """(error code, {api key: (min, max)}) of an ApiVersions response body.

    Its header is v0 at every version. A broker that does not know `version` answers
    UNSUPPORTED_VERSION in the v0 layout: the ranges are then not read.
    """
    (error,) = _I16.unpack_from(body, 0)
    if error:
        return error, {}
    flexible = is_flexible(API_VERSIONS, version)
    count, pos = _read_count(body, 2, flexible)
    ranges = {}
    for _ in range(count):
        api, low, high = _API_RANGE.unpack_from(body, pos)
        pos += 6
        if flexible:
            pos = skip_tags(body, pos)
        ranges[api] = (low, high)
    return error, ranges


# --- Metadata (leaders, brokers, topic ids) --------------------------------------------

METADATA_FROM = 1  # the oldest Metadata version read here (v0 has no controller, no racks)


@dataclass(frozen=True, slots=True)
class TopicMetadata:
    """One topic of a Metadata response: its id (zeros before v10) and each partition's leader."""

    name: str
    error: int
    topic_id: bytes
    leaders: dict[int, int]


def metadata_request(topics: Sequence[str], version: int) -> bytes:
    """A Metadata request body (v1..12) for `topics`, creating none."""
    flexible = is_flexible(METADATA, version)
    parts = [_count(len(topics), flexible)]
    for topic in topics:
        if version >= 10:
            parts.append(NO_TOPIC_ID)
        parts.append(_string(topic, flexible) + (b"\0" if flexible else b""))
    if version >= 4:
        parts.append(b"\0")  # allow auto topic creation: false
    if 8 <= version <= 10:
        parts.append(b"\0")  # include cluster authorized operations
    if version >= 8:
        parts.append(b"\0")  # include topic authorized operations
    if flexible:
        parts.append(b"\0")  # tagged fields
    return b"".join(parts)


def parse_metadata(
    body: bytes, version: int
) -> tuple[dict[int, tuple[str, int]], list[TopicMetadata]]:
    """({node id: (host, port)}, topics) of a Metadata response body (v1..12)."""
    flexible = is_flexible(METADATA, version)
    pos = skip_tags(body, 0) if flexible else 0  # response header v1
    if version >= 3:
        pos += 4  # throttle time
    brokers = {}
    count, pos = _read_count(body, pos, flexible)
    for _ in range(count):
        (node,) = _I32.unpack_from(body, pos)
        host, pos = _read_string(body, pos + 4, flexible)
        (port,) = _I32.unpack_from(body, pos)
        _, pos = _read_string(body, pos + 4, flexible)  # rack
        if flexible:
            pos = skip_tags(body, pos)
        brokers[node] = (host or "", port)
    if version >= 2:
        _, pos = _read_string(body, pos, flexible)  # cluster id
    pos += 4  # controller id
    topics = []
    count, pos = _read_count(body, pos, flexible)
    for _ in range(count):
        (error,) = _I16.unpack_from(body, pos)
        name, pos = _read_string(body, pos + 2, flexible)
        topic_id = NO_TOPIC_ID
        if version >= 10:
            topic_id, pos = body[pos : pos + 16], pos + 16
        pos += 1  # is internal
        leaders = {}
        partitions, pos = _read_count(body, pos, flexible)
        for _ in range(partitions):
            _, partition, leader = struct.unpack_from(">hii", body, pos)
            pos += 10 + (4 if version >= 7 else 0)  # error, index, leader, leader epoch
            # replicas, in-sync replicas, offline replicas (v5+)
            for _ in range(3 if version >= 5 else 2):
                nodes, pos = _read_count(body, pos, flexible)
                pos += 4 * max(nodes, 0)
            if flexible:
                pos = skip_tags(body, pos)
            leaders[partition] = leader
        if version >= 8:
            pos += 4  # topic authorized operations
        if flexible:
            pos = skip_tags(body, pos)
        topics.append(TopicMetadata(name or "", error, topic_id, leaders))
    return brokers, topics


def parse_metadata_response(body: bytes, version: int) -> list[TopicMetadata]:
    """The topics of a Metadata response body (v1..12)."""
    return parse_metadata(body, version)[1]


# --- Fetch ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PartitionData:
    """One partition of a Fetch response: its records are `body[start:end]`."""

    partition: int
    error: int
    high_watermark: int
    start: int
    end: int


def _fetch_head(version: int) -> struct.Struct:
    """Fetch head: replica (to v14), wait, min/max bytes, isolation, session (v7+)."""
    fields = ">" + ("i" if version <= 14 else "") + "iiib" + ("ii" if version >= 7 else "")
    return struct.Struct(fields)


def _fetch_partition(version: int) -> struct.Struct:
    """Fetch partition: index, epoch (v9+), offset, last epoch (v12+), log start (v5+), max."""
    fields = ">i" + ("i" if version >= 9 else "") + "q" + ("i" if version >= 12 else "")
    fields += ("q" if version >= 5 else "") + "i" + ("b" if version >= 12 else "")
    return struct.Struct(fields)


_FETCH_HEADS = {v: _fetch_head(v) for v in range(4, 19)}
_FETCH_PARTITIONS = {v: _fetch_partition(v) for v in range(4, 19)}


def fetch_request(
    version: int,
    topic: str | bytes,
    positions: Sequence[tuple[int, int]],
    max_wait_ms: int,
    min_bytes: int,
    max_bytes: int,
    partition_max_bytes: int,
) -> bytes:
    """A sessionless Fetch request body for one topic: `positions` are (partition, offset).

    `topic` is its name, or from v13 its 16-byte id.
    """
    flexible = version >= FLEXIBLE_FROM[FETCH]
    head = [max_wait_ms, min_bytes, max_bytes, 0]  # isolation: read uncommitted
    if version <= 14:
        head.insert(0, -1)  # replica id: a consumer
    if version >= 7:
        head += [0, -1]  # no fetch session
    parts = [_FETCH_HEADS[version].pack(*head), _count(1, flexible)]
    if version >= TOPIC_IDS_FROM:
        assert isinstance(topic, bytes) and len(topic) == 16, "Fetch v13+ names the topic by id"
        parts.append(topic)
    else:
        assert isinstance(topic, str)
        parts.append(_string(topic, flexible))
    parts.append(_count(len(positions), flexible))
    partition = _FETCH_PARTITIONS[version].pack
    if version >= 12:  # epochs unknown, log start offset unknown, no tagged fields
        parts += [
            partition(p, -1, offset, -1, -1, partition_max_bytes, 0) for p, offset in positions
        ]
    elif version >= 9:
        parts += [partition(p, -1, offset, -1, partition_max_bytes) for p, offset in positions]
    elif version >= 5:
        parts += [partition(p, offset, -1, partition_max_bytes) for p, offset in positions]
    else:
        parts += [partition(p, offset, partition_max_bytes) for p, offset in positions]
    if flexible:
        parts.append(b"\0\x01\x01\0")  # topic tags, no forgotten topics, rack "", tags
    else:
        if version >= 7:
            parts.append(b"\0\0\0\0")  # no forgotten topics
        if version >= 11:
            parts.append(b"\0\0")  # rack ""
    return b"".join(parts)


def _read_topic(body: bytes, pos: int, version: int, flexible: bool) -> tuple[str | bytes, int]:
    """A Fetch or Produce response's topic: its name, or from v13 its 16-byte id."""
    if version >= TOPIC_IDS_FROM:
        return body[pos : pos + 16], pos + 16
    name, pos = _read_string(body, pos, flexible)
    return name or "", pos


_PARTITION_HEAD = struct.Struct(">ihqq")  # partition, error, high watermark, last stable offset


def parse_fetch_response(
    body: bytes, version: int
) -> tuple[int, list[tuple[str | bytes, PartitionData]]]:
    """(top-level error, partitions) of a Fetch response body (after the correlation id).

    Each partition comes with its topic: the name, or from v13 the 16-byte id.
    """
    flexible = version >= FLEXIBLE_FROM[FETCH]
    pos = skip_tags(body, 0) if flexible else 0  # response header v1
    pos += 4  # throttle time
    error = 0
    if version >= 7:
        (error,) = _I16.unpack_from(body, pos)
        pos += 6  # error, session id
    out: list[tuple[str | bytes, PartitionData]] = []
    topics, pos = _read_count(body, pos, flexible)
    log_start = 8 if version >= 5 else 0
    unpack_head = _PARTITION_HEAD.unpack_from
    for _ in range(topics):
        topic, pos = _read_topic(body, pos, version, flexible)
        partitions, pos = _read_count(body, pos, flexible)
        for _ in range(partitions):
            partition, code, high, _ = unpack_head(body, pos)
            pos += 22 + log_start  # and the log start offset (v5+)
            if flexible:
                aborted, pos = read_uvarint(body, pos)
                for _ in range(aborted - 1):  # producer id, first offset, tagged fields
                    pos = skip_tags(body, pos + 16)
                pos += 4  # preferred read replica
                size, pos = read_uvarint(body, pos)
                size -= 1
            else:
                (aborted,) = _I32.unpack_from(body, pos)
                pos += 4 + 16 * max(aborted, 0)
                if version >= 11:
                    pos += 4  # preferred read replica
                (size,) = _I32.unpack_from(body, pos)
                pos += 4
            size = max(size, 0)  # -1: null records
            out.append((topic, PartitionData(partition, code, high, pos, pos + size)))
            pos += size
            if flexible:
                pos = skip_tags(body, pos)  # diverging epoch, current leader, snapshot id
        if flexible:
            pos = skip_tags(body, pos)
    return error, out


# --- Produce ----------------------------------------------------------------------------

_PRODUCE_HEAD = struct.Struct(">hhii")  # transactional id (null), acks, timeout, topics
_PRODUCE_HEAD_FLEXIBLE = struct.Struct(">bhi")  # transactional id (null), acks, timeout


def produce_request(
    version: int, topic: str | bytes, batches: Sequence[tuple[int, bytes]], timeout_ms: int
) -> list[bytes]:
    """A Produce request body (acks=all) as parts: the record batches are not copied.

    `topic` is its name, or from v13 its 16-byte id. Several v2 batches of one
    partition concatenate into its record set.
    """
    flexible = version >= FLEXIBLE_FROM[PRODUCE]
    by_partition: dict[int, list[bytes]] = {}
    for partition, data in batches:
        by_partition.setdefault(partition, []).append(data)
    if flexible:
        parts = [_PRODUCE_HEAD_FLEXIBLE.pack(0, -1, timeout_ms), b"\x02"]  # one topic
    else:
        parts = [_PRODUCE_HEAD.pack(-1, -1, timeout_ms, 1)]
    if version >= TOPIC_IDS_FROM:
        assert isinstance(topic, bytes) and len(topic) == 16, "Produce v13+ names the topic by id"
        parts.append(topic)
    else:
        assert isinstance(topic, str)
        parts.append(_string(topic, flexible))
    parts.append(_count(len(by_partition), flexible))
    for partition, datas in by_partition.items():
        size = sum(len(d) for d in datas)
        if flexible:
            parts.append(_I32.pack(partition) + uvarint(size + 1))
            parts += datas
            parts.append(b"\0")  # partition tags
        else:
            parts.append(struct.pack(">ii", partition, size))
            parts += datas
    if flexible:
        parts.append(b"\0\0")  # topic tags, tags
    return parts


def parse_produce_response(body: bytes, version: int) -> dict[tuple[str | bytes, int], int]:
    """Error code per (topic, partition) of a Produce response body (topic: name or id)."""
    flexible = version >= FLEXIBLE_FROM[PRODUCE]
    pos = skip_tags(body, 0) if flexible else 0
    out: dict[tuple[str | bytes, int], int] = {}
    topics, pos = _read_count(body, pos, flexible)
    for _ in range(topics):
        topic, pos = _read_topic(body, pos, version, flexible)
        partitions, pos = _read_count(body, pos, flexible)
        for _ in range(partitions):
            partition, error = struct.unpack_from(">ih", body, pos)
            pos += 22 + (8 if version >= 5 else 0)  # base offset, append time, log start
            if version >= 8:
                errors, pos = _read_count(body, pos, flexible)
                for _ in range(errors):  # batch index, message
                    _, pos = _read_string(body, pos + 4, flexible)
                    if flexible:
                        pos = skip_tags(body, pos)
                _, pos = _read_string(body, pos, flexible)  # error message
            if flexible:
                pos = skip_tags(body, pos)  # current leader
            out[(topic, partition)] = error
        if flexible:
            pos = skip_tags(body, pos)
    return out
