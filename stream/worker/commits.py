"""Acknowledgements -> offset commits: in batch order, never ahead of an ack, at most so often."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from aiokafka import TopicPartition

from tickserve.errors import OffsetCommitFailed

logger = logging.getLogger(__name__)

# micro-batches whose signals may be awaiting acks at once (backpressure beyond that)
MAX_INFLIGHT_BATCHES = 4


class Committer(Protocol):
    """Commits a group's offsets (`stream.kafka.base.TickSource.commit`)."""

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit; OffsetCommitFailed when the group has moved on."""


class CommitTracker:
    """Commits a micro-batch's next offsets once its acks, and every earlier batch's, are in.

    Each tracked batch completes in a task of its own, chained to the one before, so
    the next batch is fetched and scored while this one's records are on their way
    to the broker (at most `max_inflight` batches: see `full`). Acknowledged
    offsets are committed at most every `interval_s` (a crash replays at most that
    much more: at-least-once either way), and whenever a batch carries work that must
    follow a commit (a snapshot reflecting those offsets).

    `before_commit` sends what must be acknowledged before any commit but is not
    tied to one micro-batch (the monitor's summaries, gathered across micro-batches):
    each commit calls it and waits for the acks of what it sent.

    With a `transactional` committer (the exactly-once plane), a commit also commits
    everything the sink sent since the last one, so it must not fall inside a
    micro-batch: batches only record their offsets and follow-up work, and the worker
    commits in `between_batches`.
    """

    def __init__(
        self,
        committer: Committer,
        interval_s: float,
        max_inflight: int = MAX_INFLIGHT_BATCHES,
        clock: Callable[[], float] = time.monotonic,
        transactional: bool = False,
        before_commit: Callable[[], Awaitable[Sequence[asyncio.Future[Any]]]] | None = None,
    ) -> None:
        """Nothing tracked yet."""
        self._committer = committer
        self.interval_s = interval_s
        self.max_inflight = max_inflight
        self.transactional = transactional
        self._before_commit = before_commit
        self._clock = clock
        self._after_commit: list[Callable[[], Awaitable[object]]] = []  # transactional
        self.failed = False  # a commit raised (a failed transaction): no commit follows
        self.committed: dict[TopicPartition, int] = {}  # next offsets the group holds
        self._acked: dict[TopicPartition, int] = {}  # acknowledged, not yet committed
        self._inflight: deque[asyncio.Task[None]] = deque()
        self._last_commit = clock()

    def track(
        self,
        acks: list[asyncio.Future[Any]],
        offsets: dict[TopicPartition, int],
        after_commit: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        """Commit `offsets` once `acks` resolve (then run `after_commit`, if the commit held).

        Call `wait_room` when `full` before tracking more.
        """
        previous = self._inflight[-1] if self._inflight else None
        self._inflight.append(
            asyncio.create_task(self._finish(previous, acks, offsets, after_commit))
        )

    @property
    def full(self) -> bool:
        """More than `max_inflight` batches are in flight."""
        return len(self._inflight) > self.max_inflight

    async def wait_room(self) -> None:
        """Wait for the oldest batches until at most `max_inflight` are in flight."""
        while len(self._inflight) > self.max_inflight:
            await self._inflight.popleft()

    async def _finish(
        self,
        previous: asyncio.Task[None] | None,
        acks: list[asyncio.Future[Any]],
        offsets: dict[TopicPartition, int],
        after_commit: Callable[[], Awaitable[object]] | None,
    ) -> None:
        if previous is not None:
            await previous
        await asyncio.gather(*acks)
        self._acked.update(offsets)
        if self.transactional:
            if after_commit is not None:
                self._after_commit.append(after_commit)
            return
        committed = (after_commit is not None or self.due()) and await self.commit()
        if committed and after_commit is not None:
            await after_commit()

    async def between_batches(self) -> None:
        """Transactional: commit here, between two batches, when due or when work waits on it."""
        if not self.transactional:
            return
        await self.reap(block=True)  # the batches' acks are done: this records their offsets
        if self._after_commit or (self._acked and self.due()):
            await self.commit()

    def due(self) -> bool:
        """The commit interval has passed since the last commit."""
        return self._clock() - self._last_commit >= self.interval_s

    @property
    def idle_with_acks(self) -> bool:
        """Acknowledged offsets wait for a commit and no batch is in flight."""
        return bool(self._acked) and not self._inflight

    async def commit(self) -> bool:
        """Commit every acknowledged offset; False if the group moved on (a rebalance).

        Transactional: then run the work that waited on this commit (snapshot writes).
        After a commit that raised, always False: the state has moved past what the
        group holds, and nothing may be written as if it had not.
        """
        if self.failed:
            return False
        offsets, self._acked = self._acked, {}
        self._last_commit = self._clock()
        after, self._after_commit = self._after_commit, []
        try:
            if self._before_commit is not None:
                # what it sends belongs to batches processed by now, those of `offsets`
                # among them: acknowledged before they are committed
                sent = await self._before_commit()
                if sent:
                    await asyncio.gather(*sent)
            if offsets:
                await self._committer.commit(offsets)
        except OffsetCommitFailed as exc:
            # the new owner of these partitions replays their records
            logger.warning("commit failed", extra={"error": str(exc)})
            return False
        except BaseException:
            self.failed = True
            raise
        self.committed.update(offsets)
        await self._follow(after)
        return True

    @staticmethod
    async def _follow(after: list[Callable[[], Awaitable[object]]]) -> None:
        for work in after:
            await work()

    async def reap(self, block: bool) -> None:
        """Collect finished batches (re-raising their errors); with `block`, all of them."""
        while self._inflight and (block or self._inflight[0].done()):
            await self._inflight.popleft()

    def restored(self, tp: TopicPartition, offset: int) -> None:
        """A partition was (re)assigned and reads on from `offset`."""
        self.committed[tp] = offset

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Partitions taken away (after `reap(block=True)` and `commit`)."""
        for tp in partitions:
            self.committed.pop(tp, None)
