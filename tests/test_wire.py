"""`stream.kafka.wire`: its requests and responses against aiokafka's protocol structs, and
its fetcher and producer against aiokafka's own clients on the real broker."""

from __future__ import annotations

import asyncio
import importlib
import time
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.protocol.fetch import FetchResponse_v4
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from deploy.settings import Settings
from stream.kafka import protocol
from stream.kafka.clients import ensure_topics, make_consumer
from stream.kafka.protocol import parse_fetch_response
from stream.kafka.wire import Connection, WireFetcher, WireProducer
from tests.helpers import PARTITIONS, read_topic, run, unique
from tests.helpers import mixed_records as _records
from tests.helpers import produce_records as _produce
from tests.helpers import record_batch as _batch


def _aiokafka(kind: str, version: int) -> Any:
    module = importlib.import_module(
        f"aiokafka.protocol.{kind.removesuffix('Request').removesuffix('Response').lower()}"
    )
    return getattr(module, f"{kind}_v{version}")


@pytest.mark.parametrize("version", range(4, 12))  # the non-flexible ones aiokafka has
def test_fetch_request_is_aiokafkas(version: int) -> None:
    positions = [(0, 5), (2, 1 << 40)]
    ours = protocol.fetch_request(version, "ticks", positions, 20, 1, 1 << 20, 4096)
    partitions = [
        (p, *([-1] if version >= 9 else []), o, *([-1] if version >= 5 else []), 4096)
        for p, o in positions
    ]
    head: list[Any] = [-1, 20, 1, 1 << 20, 0, *([0, -1] if version >= 7 else [])]
    tail: list[Any] = ([[]] if version >= 7 else []) + ([""] if version >= 11 else [])
    theirs = _aiokafka("FetchRequest", version)(*head, [("ticks", partitions)], *tail)
    assert ours == theirs.encode()


@pytest.mark.parametrize("version", range(4, 12))
def test_fetch_response_walk_matches_aiokafkas_decoder(version: int) -> None:
    records = [_batch(3, 7), b"", None]
    rows = [(0, 0, 10, 10, [], records[0]), (1, 1, 4, 4, [(9, 2)], records[1]),
            (2, 0, 0, 0, None, records[2])]  # fmt: skip
    if version >= 5:  # log start offset
        rows = [(*row[:4], 0, *row[4:]) for row in rows]
    if version >= 11:  # preferred read replica
        rows = [(*row[:-1], -1, row[-1]) for row in rows]
    head = [0, 0, 0] if version >= 7 else [0]  # throttle time, error, session id
    body = _aiokafka("FetchResponse", version)(*head, [("ticks", rows)]).encode()
    error, parsed = protocol.parse_fetch_response(body, version)
    assert error == 0
    assert [(t, d.partition, d.error, d.high_watermark) for t, d in parsed] == [
        ("ticks", 0, 0, 10), ("ticks", 1, 1, 4), ("ticks", 2, 0, 0)
    ]  # fmt: skip
    assert [body[d.start : d.end] for _, d in parsed] == [records[0], b"", b""]


@pytest.mark.parametrize("version", range(3, 9))
def test_produce_request_is_aiokafkas_and_its_response_is_read(version: int) -> None:
    a, b, c = _batch(2, 0), _batch(1, 0), _batch(4, 0)
    ours = b"".join(protocol.produce_request(version, "signals", [(1, a), (3, b), (1, c)], 30_000))
    theirs = _aiokafka("ProduceRequest", version)(
        None, -1, 30_000, [("signals", [(1, a + c), (3, b)])]
    )
    assert ours == theirs.encode()
    rows = [(1, 0, 40, -1), (3, 6, -1, -1)]
    if version >= 5:  # log start offset
        rows = [(*row, 0) for row in rows]
    if version >= 8:  # record errors, error message
        rows = [(*rows[0], [], None), (*rows[1], [(0, "bad")], "not the leader")]
    response = _aiokafka("ProduceResponse", version)([("signals", rows)], 0)
    assert protocol.parse_produce_response(response.encode(), version) == {
        ("signals", 1): 0,
        ("signals", 3): 6,
    }


class _Transport:
    """Records what a Connection writes; it is never closed in these tests."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def writelines(self, parts: list[bytes]) -> None:
        self.written.append(b"".join(parts))

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        raise AssertionError("the connection failed")


@pytest.mark.parametrize("chunk", [1, 3, 7, 8, 50, 10_000])
def test_responses_are_matched_however_the_bytes_are_split(chunk: int) -> None:
    async def main() -> list[bytes]:
        conn = Connection("test:0")
        conn.connection_made(_Transport())  # type: ignore[arg-type]
        futures = [conn.request(1, 4, [b"x"]) for _ in range(4)]
        await asyncio.sleep(0)  # written at the end of the turn
        bodies = [b"", b"a", b"b" * 40, bytes(range(256)) * 30]
        stream = b"".join(
            (len(body) + 4).to_bytes(4, "big") + (i + 1).to_bytes(4, "big") + body
            for i, body in enumerate(bodies)
        )
        for start in range(0, len(stream), chunk):
            conn.data_received(stream[start : start + chunk])
        assert not conn._buf  # nothing left over
        return [f.result() for f in futures]

    assert asyncio.run(main()) == [b"", b"a", b"b" * 40, bytes(range(256)) * 30]


def test_one_turns_requests_leave_in_one_write_waiting_ones_last() -> None:
    async def main() -> None:
        conn = Connection("test:0")
        transport = _Transport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        fetch = conn.request(1, 4, [b"fetch"], parks=True)
        produce = conn.request(0, 3, [b"produce"])
        assert transport.written == [] and not conn.parked
        await asyncio.sleep(0)
        [written] = transport.written
        assert written.index(b"produce") < written.index(b"fetch")
        assert conn.parked  # the Fetch is out: a new request would wait behind it
        # answered in the order written: the Produce (correlation 2), then the Fetch
        conn.data_received(b"".join(n.to_bytes(4, "big") for n in (5, 2)) + b"p")
        assert produce.result() == b"p" and not fetch.done() and conn.parked
        conn.data_received(b"".join(n.to_bytes(4, "big") for n in (5, 1)) + b"f")
        assert fetch.result() == b"f" and not conn.parked

    asyncio.run(main())


def test_a_response_out_of_turn_fails_the_connection() -> None:
    async def main() -> None:
        conn = Connection("test:0")
        transport = _Transport()
        transport.close = lambda: None  # type: ignore[method-assign]
        conn.connection_made(transport)  # type: ignore[arg-type]
        waiting = conn.request(1, 4, [b"x"])
        await asyncio.sleep(0)
        conn.data_received((4).to_bytes(4, "big") + (7).to_bytes(4, "big"))
        with pytest.raises(KafkaError, match="correlation id 7"):
            waiting.result()

    asyncio.run(main())


def test_one_pass_over_a_response_equals_the_per_partition_parse() -> None:
    """parse_partitions on a whole response: same records as parse_records per partition."""
    import numpy as np

    from stream.kafka.fetched import GapRetries, parse_records
    from stream.kafka.wire import parse_partitions

    sets = [_batch(5, 10) + _batch(4, 15), b"", _batch(3, 0), _batch(2, 7) + _batch(6, 9)]
    body = FetchResponse_v4(
        0, [("t", [(p, 0, 99, 99, [], r) for p, r in enumerate(sets)])]
    ).encode()
    data = [d for _, d in parse_fetch_response(body, 4)[1]]
    fetch_offsets = np.array([12, 0, 0, 8], np.int64)  # two of them start mid-batch
    buf = np.frombuffer(body, np.uint8)
    cols, part, next_offsets, status, starts, ends = parse_partitions(
        buf, np.array([d.start for d in data]), np.array([d.end for d in data]), fetch_offsets
    )
    assert status.tolist() == [0, 0, 0, 0]
    assert len(starts) == 5 and (ends > starts).all()
    for p, d in enumerate(data):
        tp = TopicPartition("t", p)
        raw, ref, ref_next = parse_records(tp, body[d.start : d.end], int(fetch_offsets[p]),
                                           GapRetries())  # fmt: skip
        mine = cols[:, part == p]
        assert mine[0].tolist() == ref[0].tolist()
        values = [body[s : s + n] for s, n in zip(mine[3], mine[4], strict=True)]
        assert values == [raw[s : s + n] for s, n in zip(ref[3], ref[4], strict=True)]
        assert next_offsets[p] == ref_next
    assert cols[0, part == 0].tolist() == [12, 13, 14, 15, 16, 17, 18]
    # a gap (offsets 9 and up arrive before 7-8 are readable) is flagged, not skipped
    gap = FetchResponse_v4(0, [("t", [(0, 0, 99, 99, [], _batch(2, 9))])]).encode()
    gap_data = parse_fetch_response(gap, 4)[1][0][1]
    *_, gap_next, gap_status, _, _ = parse_partitions(
        np.frombuffer(gap, np.uint8), np.array([gap_data.start]), np.array([gap_data.end]),
        np.array([7]),
    )  # fmt: skip
    assert (gap_status.tolist(), gap_next.tolist()) == ([3], [7])


async def _read_wire(
    settings: Settings, topic: str, n: int
) -> tuple[dict[int, list[tuple]], dict[int, int]]:
    """(offset, key, value, timestamp) per partition through WireFetcher, positions checked
    as we go; and the newest high watermark seen per partition."""
    consumer = make_consumer(settings.bootstrap, unique("g"), [topic], max_batch=100)
    await consumer.start()
    fetcher = WireFetcher(consumer, topic, 20, bootstrap=settings.bootstrap)
    got: dict[int, list[tuple]] = {p: [] for p in range(PARTITIONS)}
    high: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 60
        while sum(map(len, got.values())) < n and time.monotonic() < deadline:
            fetched = await fetcher.poll(200)
            for i in range(len(fetched)):
                got[int(fetched.partition[i])].append(
                    (
                        int(fetched.offset[i]),
                        fetched.key(i),
                        fetched.value(i),
                        int(fetched.timestamp_ms[i]),
                    )
                )
            high.update({tp.partition: hw for tp, hw in fetched.high_watermarks.items()})
            for tp, offset in fetched.next_offsets.items():
                assert fetcher.position(tp) == offset  # the fetcher's own position moved
        assert consumer.paused() == consumer.assignment()  # aiokafka's fetcher stays idle
    finally:
        await fetcher.close()
        await consumer.stop()
    return got, high


async def _read_getmany(settings: Settings, topic: str, n: int) -> dict[int, list[tuple]]:
    consumer = make_consumer(settings.bootstrap, unique("g"), [topic], max_batch=100)
    await consumer.start()
    got: dict[int, list[tuple]] = {p: [] for p in range(PARTITIONS)}
    try:
        deadline = time.monotonic() + 60
        while sum(map(len, got.values())) < n and time.monotonic() < deadline:
            for tp, msgs in (await consumer.getmany(timeout_ms=200)).items():
                got[tp.partition].extend((m.offset, m.key, m.value, m.timestamp) for m in msgs)
    finally:
        await consumer.stop()
    return got


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_wire_fetch_equals_getmany(stack_settings: Settings, compression: str | None) -> None:
    """Same records, offsets, timestamps and order per partition; gzip through aiokafka's reader.

    The high watermark each response carries is the partition's record count once
    everything is produced (what the worker's consumer_lag reads).
    """
    topic = unique("wire")
    records = _records(3000, seed=11)
    run(ensure_topics(stack_settings.bootstrap, [topic], PARTITIONS))
    run(_produce(stack_settings.bootstrap, topic, records, compression))
    ours, high = run(_read_wire(stack_settings, topic, len(records)))
    ref = run(_read_getmany(stack_settings, topic, len(records)))
    assert sum(map(len, ours.values())) == len(records)
    for p in range(PARTITIONS):
        assert ours[p] == ref[p]
        assert [o for o, _, _, _ in ours[p]] == list(range(len(ours[p])))
        if ours[p]:
            assert high[p] == len(ours[p])


def test_a_seek_moves_the_wire_fetch(stack_settings: Settings) -> None:
    """`seek` (as the worker's restore does) is where the next records come from."""
    topic = unique("wire-seek")
    run(ensure_topics(stack_settings.bootstrap, [topic], 1))
    run(_produce(stack_settings.bootstrap, topic, [(b"k", b"v%d" % i, 0) for i in range(50)],
                 None))  # fmt: skip

    async def go() -> tuple[list[int], list[int]]:
        consumer: AIOKafkaConsumer = make_consumer(stack_settings.bootstrap, unique("g"), [topic])
        await consumer.start()
        fetcher = WireFetcher(consumer, topic, 20, bootstrap=stack_settings.bootstrap)
        first: list[int] = []
        again: list[int] = []
        try:
            while len(first) < 50:
                first += (await fetcher.poll(500)).offset.tolist()
            fetcher.seek(TopicPartition(topic, 0), 30)
            while len(again) < 20:
                fetched = await fetcher.poll(500)
                assert len(fetched), "nothing fetched after the seek"
                again += fetched.offset.tolist()
        finally:
            await fetcher.close()
            await consumer.stop()
        return first, again

    first, again = run(go())
    assert first == list(range(50))
    assert again == list(range(30, 50))


def test_wire_producer_lands_batches_in_order(stack_settings: Settings) -> None:
    topic = unique("wire-produce")
    run(ensure_topics(stack_settings.bootstrap, [topic], 2))

    async def go() -> None:
        wire = WireProducer(stack_settings.bootstrap)
        try:
            await wire.leaders.refresh([topic])
            for call in range(5):
                batches = []
                for p in (0, 1):
                    builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1 << 20)
                    for i in range(10):
                        builder.append(i, timestamp=1, key=b"k", value=b"%d-%d" % (call, i),
                                       headers=[])  # fmt: skip
                    batches.append((p, bytes(builder.build()), 10))
                futures = wire.send(topic, batches)
                assert len(futures) == 1  # one broker: one request for both partitions
            await asyncio.gather(*futures)
        finally:
            await wire.close()

    run(go())
    records = run(read_topic(stack_settings.bootstrap, topic, 2, 100))
    assert len(records) == 100
    for p in (0, 1):
        values = [r.value for r in records if r.partition == p]
        assert values == [b"%d-%d" % (c, i) for c in range(5) for i in range(10)]


def test_shared_connection_echo_lands_every_record_in_order(stack_settings: Settings) -> None:
    """Fetch and Produce in one write (a shared connection): the broker answers both, in order."""
    source, sink = unique("one-write-in"), unique("one-write-out")
    run(ensure_topics(stack_settings.bootstrap, [source, sink], 1))
    sent = [(b"k", b"v%d" % i, 0) for i in range(60)]
    run(_produce(stack_settings.bootstrap, source, sent, None))

    async def go() -> int:
        consumer: AIOKafkaConsumer = make_consumer(stack_settings.bootstrap, unique("g"), [source])
        await consumer.start()
        fetcher = WireFetcher(consumer, source, 20, bootstrap=stack_settings.bootstrap)
        wire = WireProducer(stack_settings.bootstrap, share=fetcher)
        echoed, acks = 0, []
        try:
            await wire.leaders.refresh([sink])
            deadline = time.monotonic() + 60
            while echoed < len(sent):
                # where it stuck, should it: the group join, the first position, the fetches
                where = (consumer.assignment(), fetcher.position(TopicPartition(source, 0)))
                assert time.monotonic() < deadline, f"{echoed} of {len(sent)} in 60 s at {where}"
                fetched = await fetcher.poll(500)
                if not len(fetched):  # a busy broker may answer a fetch empty
                    continue
                builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1 << 20)
                for i in range(len(fetched)):
                    builder.append(i, timestamp=1, key=None, value=fetched.value(i), headers=[])
                acks += wire.send(sink, [(0, bytes(builder.build()), len(fetched))])
                echoed += len(fetched)
            await asyncio.gather(*acks)
            return len(wire._conns._conns)  # connections of its own
        finally:
            await wire.close()
            await fetcher.close()
            await consumer.stop()

    own = run(go())
    assert own == 0  # every Produce went out with the next Fetch
    records = run(read_topic(stack_settings.bootstrap, sink, 1, len(sent)))
    assert [r.value for r in records] == [value for _, value, _ in sent]


def test_wire_producer_raises_once_retries_are_spent(stack_settings: Settings) -> None:
    """A partition that does not exist never gets a leader: the future fails, loudly."""
    topic = unique("wire-missing")
    run(ensure_topics(stack_settings.bootstrap, [topic], 1))

    async def go() -> None:
        wire = WireProducer(stack_settings.bootstrap)
        try:
            await wire.leaders.refresh([topic])
            (future,) = wire.send(topic, [(7, _batch(1, 0), 1)])
            await asyncio.wait_for(future, 30)
        finally:
            await wire.close()

    with pytest.raises(KafkaError):
        run(go())


def test_each_fetch_starts_one_partition_further_on(stack_settings: Settings) -> None:
    """No partition is always listed last (a broker fills a response in the listed order)."""
    topic = unique("wire-turns")
    run(ensure_topics(stack_settings.bootstrap, [topic], PARTITIONS))

    async def go() -> list[int]:
        consumer: AIOKafkaConsumer = make_consumer(stack_settings.bootstrap, unique("g"), [topic])
        await consumer.start()
        fetcher = WireFetcher(consumer, topic, 20, bootstrap=stack_settings.bootstrap)
        firsts: list[int] = []
        try:
            deadline = time.monotonic() + 60
            while len(firsts) < 2 * PARTITIONS and time.monotonic() < deadline:
                await fetcher.poll(50)
                for _, positions, _ in fetcher._inflight.values():
                    assert sorted(positions) == list(range(PARTITIONS))
                    if not firsts or firsts[-1] != next(iter(positions)):
                        firsts.append(next(iter(positions)))
        finally:
            await fetcher.close()
            await consumer.stop()
        return firsts

    firsts = run(go())
    assert len(firsts) == 2 * PARTITIONS
    assert set(firsts) == set(range(PARTITIONS))
