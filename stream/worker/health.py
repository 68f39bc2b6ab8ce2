"""Whether the stream advances: a stall is lag that has not moved for `stall_after_s`.

An idle stream (no lag) is healthy however long it stays quiet; a busy one is healthy
as long as its positions move. `ProgressWatch.reason` says "stalled ..." otherwise,
and `/ready` turns false with it (`StreamWorker.not_ready_reason`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

from aiokafka import TopicPartition


class ProgressWatch:
    """Positions and lag per partition, and since when the stream last advanced."""

    def __init__(self, stall_after_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        """Nothing observed yet; the stall clock starts now."""
        self.stall_after_s = stall_after_s
        self._clock = clock
        self._positions: dict[TopicPartition, int] = {}
        self.lag: dict[TopicPartition, int] = {}
        self._since = clock()  # last time a position moved or nothing was left to do

    def observe(
        self, positions: Mapping[TopicPartition, int], lag: Mapping[TopicPartition, int]
    ) -> None:
        """The next offsets the worker reads from and the lag known now, per partition."""
        now = self._clock()
        for tp, position in positions.items():
            if self._positions.get(tp) != position:
                self._positions[tp] = position
                self._since = now
        self.lag.update(lag)
        if lag and not any(self.lag.values()):
            self._since = now  # caught up (as just seen): quiet is not stalled

    def quiet_s(self) -> float:
        """Seconds since the stream last advanced (or had nothing to do)."""
        return self._clock() - self._since

    def positions(self) -> dict[TopicPartition, int]:
        """The last position observed per partition."""
        return dict(self._positions)

    def reason(self) -> str | None:
        """Why the stream is stalled (no position moved for `stall_after_s`, lag), or None.

        >>> tp = TopicPartition("ticks", 0)
        >>> clock = iter([0.0, 1.0, 32.0]).__next__
        >>> watch = ProgressWatch(30.0, clock)
        >>> watch.observe({tp: 5}, {tp: 40})
        >>> watch.reason()
        'stalled: no progress for 31 s while partition 0 lags 40 records'
        """
        quiet = self.quiet_s()
        lagging = sorted((tp.partition, n) for tp, n in self.lag.items() if n > 0)
        if quiet <= self.stall_after_s or not lagging:
            return None
        parts = ", ".join(str(p) for p, _ in lagging)
        noun = "partition" if len(lagging) == 1 else "partitions"
        verb = "lags" if len(lagging) == 1 else "lag"
        total = sum(n for _, n in lagging)
        return f"stalled: no progress for {quiet:.0f} s while {noun} {parts} {verb} {total} records"

    def restart(self) -> None:
        """A new assignment: the stall clock starts again (restoring is not stalling)."""
        self._since = self._clock()

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Partitions taken away."""
        for tp in partitions:
            self._positions.pop(tp, None)
            self.lag.pop(tp, None)
