"""The accounting oracle: every tick offset ends as one signal, one dead letter or one counted drop.

It reads the ticks, signals and dead-letter topics back with a plain aiokafka consumer
(aiokafka's own record parser, none of the worker's columnar fetch or prebuilt
batches), and matches each outcome to its tick: a signal by the (partition, offset)
it carries and the tick's trade id, a dead letter by its `source` header and the
record's bytes. A tick with two outcomes of one kind has a duplicate (identified as
such by its position), one with a signal and a dead letter is a conflict, an outcome
naming no tick in the log is foreign, and a tick with none is lost unless the test
counted it as dropped.

With `committed_only`, the signals and dead letters are read as a read_committed
consumer sees them, from the log's own transaction markers (`read_committed_log`): the
local broker keeps the markers but leaves aborted records visible to such consumers.

With TICKSERVE_FAULTS_RESULTS set, `record` writes each fault's row there as JSON
(`python -m tests.faults.report` renders docs/faults.md from those files).
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import os
import platform
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.record.memory_records import MemoryRecords

if TYPE_CHECKING:
    from deploy.settings import Settings

RESULTS_ENV = "TICKSERVE_FAULTS_RESULTS"

# (partition, offset) of a record on the ticks topic
Position = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Logged:
    """One record read back: where it sits, its broker timestamp, its bytes and headers."""

    partition: int
    offset: int
    ts_ms: int
    value: bytes | None
    headers: dict[str, bytes]


@dataclass
class Account:
    """What became of every tick of one run; the figures of docs/faults.md's table.

    Attributes:
        ticks: Records the ticks topic holds (all epochs passed in).
        signalled: Ticks with at least one signal.
        dead_lettered: Ticks with at least one dead letter.
        dropped: Ticks without either that the test counted as dropped (it says why).
        lost: Ticks with no outcome and not counted.
        duplicates: Outcomes beyond the first of their tick (same kind, same position).
        conflicts: Ticks with both a signal and a dead letter.
        foreign: Signals or dead letters that name no tick of the log.
        aborted: With committed_only, records of aborted (or never ended) transactions on
            the signals and dead-letter topics, left out of the count.
        recover_s: From the end of the fault until the last tick waiting then (or
            arriving later) had its first outcome; None when no fault end was given.
        reasons: Dead letters per reason header (a conflict's dead letter too: why the
            tick was refused after it had a signal).
        lost_sample: A few lost positions, for the failure message.
    """

    ticks: int
    signalled: int
    dead_lettered: int
    dropped: int
    lost: int
    duplicates: int
    conflicts: int
    foreign: int
    recover_s: float | None
    reasons: dict[str, int] = field(default_factory=dict)
    lost_sample: list[Position] = field(default_factory=list)
    aborted: int = 0  # with committed_only: records of aborted transactions left out

    def check(self, max_duplicates: int = 0) -> None:
        """Fail with the whole account unless every tick ended exactly once (bar duplicates)."""
        assert self.ticks > 0, self
        assert (self.lost, self.conflicts, self.foreign) == (0, 0, 0), self
        assert self.signalled + self.dead_lettered + self.dropped == self.ticks, self
        assert self.duplicates <= max_duplicates, self


def _consumer(bootstrap: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        fetch_max_wait_ms=500,  # short waits stall on the local broker's many-batch topics
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    deadline = time.monotonic() + 10
    while True:
        found = consumer.partitions_for_topic(topic)
        if found:
            return [TopicPartition(topic, p) for p in sorted(found)]
        assert time.monotonic() < deadline, f"topic {topic} has no partitions"
        await consumer._client.force_metadata_update()


def _logged(record: object) -> Logged:
    return Logged(
        record.partition,  # type: ignore[attr-defined]
        record.offset,  # type: ignore[attr-defined]
        record.timestamp,  # type: ignore[attr-defined]
        record.value,  # type: ignore[attr-defined]
        {k: bytes(v) for k, v in record.headers},  # type: ignore[attr-defined]
    )


async def read_log(bootstrap: str, topic: str, timeout_s: float = 60.0) -> list[Logged]:
    """Every record `topic` holds now, read to its end offsets (asked until they stay put).

    The local broker's end offsets can lag a produce by a few records for a moment
    (shared/BROKER.md 4), so the end is asked again after a pause until it repeats.
    """
    consumer = _consumer(bootstrap)
    await consumer.start()
    records: list[Logged] = []
    try:
        parts = await _partitions(consumer, topic)
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        deadline = time.monotonic() + timeout_s
        ends: dict[TopicPartition, int] = {}
        while True:
            assert time.monotonic() < deadline, f"{topic}: end not reached, {ends}"
            for msgs in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(_logged(m) for m in msgs)
            positions = [await consumer.position(tp) for tp in parts]
            at_end = all(p >= ends.get(tp, 1 << 62) for p, tp in zip(positions, parts, strict=True))
            if at_end:
                await asyncio.sleep(0.3)
                again = await consumer.end_offsets(parts)
                if again == ends:
                    return records
                ends = again
            elif not ends:
                ends = await consumer.end_offsets(parts)
    finally:
        await consumer.stop()


@dataclass
class CommittedLog:
    """A topic as a read_committed consumer sees it, and what its transactions took back."""

    records: list[Logged] = field(default_factory=list)
    aborted: int = 0  # records of aborted transactions
    open: int = 0  # records of transactions with no marker yet


async def read_committed_log(bootstrap: str, topic: str, partitions: int) -> CommittedLog:
    """Every committed record of `topic`: plain ones, and transactional ones once their
    producer's COMMIT marker follows (an ABORT marker drops them), per Kafka's protocol.

    Raw Fetch requests (read uncommitted) and aiokafka's record reader, so that the
    markers themselves are seen: the local broker writes them but does not list aborted
    transactions in its Fetch answers, which is how read_committed clients skip them.
    """
    from stream.kafka import protocol
    from stream.kafka.wire import Connection

    host, port = bootstrap.split(",")[0].rsplit(":", 1)
    conn = await Connection.open(host, int(port))
    out = CommittedLog()
    try:
        for partition in range(partitions):
            pending: dict[int, list[Logged]] = {}
            offset = 0
            while True:
                body = await conn.request(
                    protocol.FETCH,
                    4,
                    [
                        protocol.fetch_request(
                            4, topic, [(partition, offset)], 100, 1, 1 << 24, 1 << 24
                        )
                    ],
                )
                _error, [(_topic, data)] = protocol.parse_fetch_response(body, 4)
                assert data.error == 0, f"{topic}/{partition}: fetch error {data.error}"
                batches = MemoryRecords(body[data.start : data.end])
                while (batch := batches.next_batch()) is not None:
                    for r in batch:
                        if batch.is_control_batch:
                            kind = int.from_bytes(r.key[2:4], "big")  # 0 abort, 1 commit
                            done = pending.pop(batch.producer_id, [])
                            if kind == 1:
                                out.records += done
                            else:
                                out.aborted += len(done)
                            continue
                        logged = Logged(
                            partition,
                            r.offset,
                            r.timestamp,
                            r.value,
                            {k: bytes(v) for k, v in r.headers},
                        )
                        if batch.is_transactional:
                            pending.setdefault(batch.producer_id, []).append(logged)
                        else:
                            out.records.append(logged)
                    offset = batch.next_offset
                if offset >= data.high_watermark:
                    break
            out.open += sum(len(v) for v in pending.values())
    finally:
        await conn.close()
    return out


def _trade_id(value: bytes | None) -> str | None:
    """The tick's trade id as a signal states it, None when the record has none."""
    try:
        doc = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    tid = doc.get("trade_id")
    if isinstance(tid, bool) or not isinstance(tid, str | int):
        return None
    return str(tid)


class _Outcomes:
    """Signals and dead letters read so far, by the tick position they name."""

    def __init__(self, ticks_topic: str) -> None:
        self.ticks_topic = ticks_topic
        self.signals: dict[Position, list[tuple[str, int]]] = collections.defaultdict(list)
        self.letters: dict[Position, list[tuple[bytes | None, int, str]]] = collections.defaultdict(
            list
        )
        self.unreadable = 0  # outcomes that name no position at all

    def add_signal(self, record: Logged) -> Position | None:
        try:
            doc = orjson.loads(record.value or b"")
            where = (int(doc["partition"]), int(doc["offset"]))
            tid = str(doc["trade_id"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            self.unreadable += 1
            return None
        self.signals[where].append((tid, record.ts_ms))
        return where

    def add_letter(self, record: Logged) -> Position | None:
        topic, _, rest = record.headers.get("source", b"").decode().rpartition("/")
        topic, _, partition = topic.rpartition("/")
        if topic != self.ticks_topic or not partition.isdigit() or not rest.isdigit():
            self.unreadable += 1
            return None
        where = (int(partition), int(rest))
        reason = record.headers.get("reason", b"").decode()
        self.letters[where].append((record.value, record.ts_ms, reason))
        return where


def answered(settings: Settings, **options: Any) -> Account:
    """`account` of `settings`' ticks, signals and dead-letter topics, from a synchronous test.

    `options` are `account`'s keyword arguments (expect_ticks, fault_end, ...).
    """
    return asyncio.run(
        account(
            settings.bootstrap,
            settings.ticks_topic,
            settings.signals_topic,
            settings.dlq_topic,
            **options,
        )
    )


async def account(
    bootstrap: str,
    ticks_topic: str,
    signals_topic: str,
    dlq_topic: str,
    *,
    expect_ticks: int | None = None,
    fault_end: float | None = None,
    dropped: Iterable[Position] = (),
    earlier: Iterable[list[Logged]] = (),
    timeout_s: float = 90.0,
    committed_only: bool = False,
    partitions: int = 4,
) -> Account:
    """Read the three topics back until every tick has an outcome (or `timeout_s`); count.

    Args:
        expect_ticks: Records the ticks topic must hold (checked), None: any.
        fault_end: Wall-clock time (s since the epoch) the fault ended; gives recover_s.
        dropped: Positions the test counts as dropped without an outcome (it says why).
        earlier: Logs of earlier incarnations of the ticks topic (read before it was
            deleted): their signals are theirs, not foreign, and they are accounted too.
        committed_only: Count only committed records of the signals and dead-letter
            topics (`read_committed_log`, over `partitions` partitions each).
    """
    ticks = await read_log(bootstrap, ticks_topic)
    if expect_ticks is not None:
        assert len(ticks) == expect_ticks, f"{ticks_topic} holds {len(ticks)} records"
    epochs = [*earlier, ticks]
    drops = set(dropped)
    wanted: set[Position] = set()
    for log in epochs:
        wanted.update((r.partition, r.offset) for r in log)
    wanted -= drops
    if committed_only:
        topics = (ticks_topic, signals_topic, dlq_topic)
        return await _account_committed(
            bootstrap, topics, partitions, epochs, drops, wanted, fault_end, timeout_s
        )
    outcomes = _Outcomes(ticks_topic)
    consumer = _consumer(bootstrap)
    await consumer.start()
    try:
        parts = [*await _partitions(consumer, signals_topic)]
        parts += await _partitions(consumer, dlq_topic)
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        covered: set[Position] = set()
        deadline = time.monotonic() + timeout_s
        while not wanted <= covered and time.monotonic() < deadline:
            for tp, msgs in (await consumer.getmany(timeout_ms=200)).items():
                add = outcomes.add_signal if tp.topic == signals_topic else outcomes.add_letter
                for m in msgs:
                    where = add(_logged(m))
                    if where is not None:
                        covered.add(where)
        # to the end of both topics, so that duplicates written late are seen too
        await asyncio.sleep(1.0)
        ends = await consumer.end_offsets(parts)
        while [tp for tp in parts if await consumer.position(tp) < ends[tp]]:
            if time.monotonic() > deadline + 10:
                break
            for tp, msgs in (await consumer.getmany(timeout_ms=200)).items():
                add = outcomes.add_signal if tp.topic == signals_topic else outcomes.add_letter
                for m in msgs:
                    add(_logged(m))
    finally:
        await consumer.stop()
    return _tally(epochs, outcomes, drops, fault_end)


async def _account_committed(
    bootstrap: str,
    topics: tuple[str, str, str],
    partitions: int,
    epochs: list[list[Logged]],
    drops: set[Position],
    wanted: set[Position],
    fault_end: float | None,
    timeout_s: float,
) -> Account:
    """`account` over the committed records only, read again until every tick has one."""
    ticks_topic, signals_topic, dlq_topic = topics
    deadline = time.monotonic() + timeout_s
    while True:
        outcomes = _Outcomes(ticks_topic)
        signals = await read_committed_log(bootstrap, signals_topic, partitions)
        letters = await read_committed_log(bootstrap, dlq_topic, partitions)
        covered = {where for r in signals.records if (where := outcomes.add_signal(r))}
        covered |= {where for r in letters.records if (where := outcomes.add_letter(r))}
        if (wanted <= covered and not signals.open + letters.open) or (time.monotonic() > deadline):
            break
        await asyncio.sleep(1.0)
    result = _tally(epochs, outcomes, drops, fault_end)
    result.aborted = signals.aborted + letters.aborted
    return result


def _tally(
    epochs: list[list[Logged]], outcomes: _Outcomes, drops: set[Position], fault_end: float | None
) -> Account:
    signalled = dead_lettered = dropped = lost = duplicates = conflicts = 0
    matched_signals = matched_letters = 0
    reasons: collections.Counter[str] = collections.Counter()
    recover_ms = 0
    end_ms = None if fault_end is None else round(fault_end * 1000)
    lost_sample: list[Position] = []
    for log in epochs:
        for tick in log:
            where = (tick.partition, tick.offset)
            tid = _trade_id(tick.value)
            sigs = [ts for t, ts in outcomes.signals.get(where, ()) if tid is not None and t == tid]
            letters = [
                (ts, why) for v, ts, why in outcomes.letters.get(where, ()) if v == tick.value
            ]
            matched_signals += len(sigs)
            matched_letters += len(letters)
            if sigs and letters:
                conflicts += 1
                reasons[letters[0][1]] += 1
            elif sigs:
                signalled += 1
            elif letters:
                dead_lettered += 1
                reasons[letters[0][1]] += 1
            elif where in drops:
                dropped += 1
            else:
                lost += 1
                if len(lost_sample) < 10:
                    lost_sample.append(where)
            duplicates += max(len(sigs) - 1, 0) + max(len(letters) - 1, 0)
            first = min([*sigs, *(ts for ts, _ in letters)], default=None)
            if end_ms is not None and first is not None and first >= end_ms:
                recover_ms = max(recover_ms, first - max(tick.ts_ms, end_ms))
    n_signals = sum(len(v) for v in outcomes.signals.values())
    n_letters = sum(len(v) for v in outcomes.letters.values())
    foreign = n_signals + n_letters - matched_signals - matched_letters + outcomes.unreadable
    return Account(
        ticks=sum(len(log) for log in epochs),
        signalled=signalled,
        dead_lettered=dead_lettered,
        dropped=dropped,
        lost=lost,
        duplicates=duplicates,
        conflicts=conflicts,
        foreign=foreign,
        recover_s=None if end_ms is None else recover_ms / 1000,
        reasons=dict(sorted(reasons.items())),
        lost_sample=lost_sample,
    )


def archived(
    ticks: list[Logged], final: list[Position], inserted: list[Position], recover_s: float
) -> Account:
    """The account of an archive: every tick one row under FINAL, none without a tick.

    Args:
        ticks: The ticks topic, read back.
        final: (partition, offset) of the archived rows as readers see them (FINAL).
        inserted: The same for every row inserted, before deduplication: rows beyond
            `final` are duplicates a replay inserted and the table's key collapsed.
    """
    rows = collections.Counter(final)
    held = {(t.partition, t.offset) for t in ticks}
    lost = [(t.partition, t.offset) for t in ticks if (t.partition, t.offset) not in rows]
    return Account(
        ticks=len(ticks),
        signalled=sum(1 for where in held if rows[where] == 1),
        dead_lettered=0,
        dropped=0,
        lost=len(lost),
        duplicates=len(inserted) - len(final),
        conflicts=sum(1 for where in held if rows[where] > 1),  # doubled after FINAL
        foreign=sum(n for where, n in rows.items() if where not in held),
        recover_s=round(recover_s, 3),
        lost_sample=lost[:10],
    )


def record(fault: str, result: Account, note: str = "") -> None:
    """Write the fault's row to $TICKSERVE_FAULTS_RESULTS/<slug>.json when that is set.

    Called before the test asserts, so that a failing run leaves its figures too.
    """
    out = os.environ.get(RESULTS_ENV)
    if not out:
        return
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    row = {
        "fault": fault,
        "note": note,
        **asdict(result),
        "ran_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "load1": round(os.getloadavg()[0], 2),
    }
    slug = re.sub(r"[^a-z0-9]+", "-", fault.lower()).strip("-")
    (path / f"{slug}.json").write_bytes(orjson.dumps(row, option=orjson.OPT_INDENT_2))
