"""CommitTracker: offsets are committed in batch order, only once acknowledged."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import TopicPartition

from stream.kafka.testing import FakeSink, FakeSource
from stream.worker.commits import CommitTracker

TP0, TP1 = TopicPartition("t", 0), TopicPartition("t", 1)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_commit_waits_for_its_acks_and_every_earlier_batch() -> None:
    async def main() -> None:
        source, sink, clock = FakeSource(), FakeSink(auto_ack=False), Clock()
        commits = CommitTracker(source, interval_s=0.0, clock=clock)
        first = await sink.send("s", [(0, b"a", 1)])
        second = await sink.send("s", [(1, b"b", 1)])
        commits.track(first, {TP0: 10})
        commits.track(second, {TP1: 5})
        second[0].set_result(None)  # the later batch is acknowledged first
        await asyncio.sleep(0.01)
        assert source.commits == []  # nothing before the earlier batch's ack
        first[0].set_result(None)
        await commits.reap(block=True)
        assert source.committed_offsets == {TP0: 10, TP1: 5}
        assert commits.committed == {TP0: 10, TP1: 5}

    asyncio.run(main())


def test_commits_are_spaced_by_the_interval_and_a_quiet_stream_catches_up() -> None:
    async def main() -> None:
        source, sink, clock = FakeSource(), FakeSink(), Clock()
        commits = CommitTracker(source, interval_s=1.0, clock=clock)
        commits.track(await sink.send("s", [(0, b"a", 1)]), {TP0: 1})
        await commits.reap(block=True)
        assert source.commits == [] and commits.idle_with_acks  # not due yet
        clock.now = 1.0
        assert commits.due()
        assert await commits.commit()
        assert source.commits == [{TP0: 1}] and not commits.idle_with_acks

    asyncio.run(main())


def test_work_after_a_commit_runs_only_if_the_commit_held() -> None:
    async def main() -> None:
        source, sink = FakeSource(), FakeSink()
        commits = CommitTracker(source, interval_s=100.0)
        ran: list[str] = []

        async def after() -> None:
            ran.append("snapshot")

        source.refuse_commits = True  # the group moved on: a rebalance
        commits.track(await sink.send("s", [(0, b"a", 1)]), {TP0: 3}, after)
        await commits.reap(block=True)
        assert ran == [] and commits.committed == {}
        source.refuse_commits = False
        commits.track(await sink.send("s", [(0, b"b", 1)]), {TP0: 4}, after)
        await commits.reap(block=True)
        assert ran == ["snapshot"] and commits.committed == {TP0: 4}

    asyncio.run(main())


def test_backpressure_beyond_the_batches_in_flight() -> None:
    async def main() -> None:
        source, sink = FakeSource(), FakeSink(auto_ack=False)
        commits = CommitTracker(source, interval_s=0.0, max_inflight=2)
        for offset in range(3):
            commits.track(await sink.send("s", [(0, b"x", 1)]), {TP0: offset + 1})
        assert commits.full
        sink.settle()
        await commits.wait_room()
        assert not commits.full
        await commits.reap(block=True)
        assert commits.committed == {TP0: 3}
        commits.forget({TP0})
        assert commits.committed == {}

    asyncio.run(main())


def test_a_transactional_commit_falls_between_batches_with_every_batch_sent() -> None:
    """A transaction commits what the sink sent: never inside a batch, never without its offsets."""

    async def main() -> None:
        source, sink, clock = FakeSource(), FakeSink(), Clock()
        commits = CommitTracker(source, interval_s=1.0, clock=clock, transactional=True)
        written: list[dict[TopicPartition, int]] = []

        async def snapshot() -> None:
            written.append(dict(source.committed_offsets))

        clock.now = 5.0  # due
        commits.track(await sink.send("s", [(0, b"a", 1)]), {TP0: 3})
        commits.track(await sink.send("s", [(1, b"b", 1)]), {TP1: 7}, snapshot)
        await asyncio.sleep(0.01)  # the batches' tasks ran: at least once, they would commit
        assert source.commits == [] and written == []
        await commits.between_batches()  # due, and a snapshot waits on the commit
        assert source.commits == [{TP0: 3, TP1: 7}]
        assert written == [{TP0: 3, TP1: 7}]  # the snapshot followed the commit
        commits.track(await sink.send("s", [(0, b"c", 1)]), {TP0: 4})
        await commits.between_batches()  # not due: the next batch joins the transaction
        assert len(source.commits) == 1

    asyncio.run(main())


def test_after_a_commit_that_raised_no_commit_claims_success() -> None:
    """A failed transaction leaves the state ahead of the group: nothing may follow it."""

    class Broken(FakeSource):
        async def commit(self, offsets: dict[TopicPartition, int]) -> None:
            raise RuntimeError("transaction aborted")

    async def main() -> None:
        source, sink = Broken(), FakeSink()
        commits = CommitTracker(source, interval_s=0.0, transactional=True)
        commits.track(await sink.send("s", [(0, b"a", 1)]), {TP0: 3})
        with pytest.raises(RuntimeError, match="aborted"):
            await commits.between_batches()
        assert commits.failed
        assert await commits.commit() is False  # on revoke or stop: no snapshot follows

    asyncio.run(main())


def test_a_commit_first_sends_what_waits_for_it_and_commits_once_that_is_acknowledged() -> None:
    async def main() -> None:
        source, sink = FakeSource(), FakeSink(auto_ack=False)
        sent: list[asyncio.Future[None]] = []

        async def before_commit() -> list[asyncio.Future[None]]:
            sent.extend(await sink.send("summaries", [(0, b"rows", 1)]))
            return sent

        commits = CommitTracker(source, interval_s=0.0, before_commit=before_commit)
        acks = await sink.send("s", [(0, b"a", 1)])
        commits.track(acks, {TP0: 3})
        acks[0].set_result(None)
        await asyncio.sleep(0.01)
        assert len(sent) == 1 and source.commits == []  # sent, not yet acknowledged
        sent[0].set_result(None)
        await commits.reap(block=True)
        assert source.commits == [{TP0: 3}]

    asyncio.run(main())


def test_a_refused_before_commit_record_stops_the_commits() -> None:
    async def main() -> None:
        source, sink = FakeSource(), FakeSink(auto_ack=False)

        async def before_commit() -> list[asyncio.Future[None]]:
            [ack] = await sink.send("summaries", [(0, b"rows", 1)])
            ack.set_exception(RuntimeError("refused"))
            return [ack]

        commits = CommitTracker(source, interval_s=0.0, before_commit=before_commit)
        acks = await sink.send("s", [(0, b"a", 1)])
        commits.track(acks, {TP0: 3})
        acks[0].set_result(None)
        with pytest.raises(RuntimeError, match="refused"):
            await commits.reap(block=True)
        assert source.commits == [] and commits.failed
        assert not await commits.commit()  # nothing is committed after it

    asyncio.run(main())
