"""In-memory stand-ins for the feature package's stores, for unit tests of their users."""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np

from features.snapshot import Snapshot


class MemorySnapshots:
    """`features.snapshot.SnapshotStore` in a dict: saves complete at once."""

    def __init__(self) -> None:
        """Empty."""
        self.saved: dict[tuple[str, int], Snapshot] = {}
        self.closed = False

    def save(self, topic: str, partition: int, snap: Snapshot) -> Future[None]:
        """Keep `snap` as the partition's latest."""
        self.saved[(topic, partition)] = snap
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def load(self, topic: str, partition: int) -> Snapshot | None:
        """The partition's latest snapshot, or None."""
        return self.saved.get((topic, partition))

    def close(self) -> None:
        """Mark closed."""
        self.closed = True


class RecordingWriter:
    """`features.online.OnlineWriter` that only records what it was offered."""

    def __init__(self) -> None:
        """Nothing offered yet."""
        self.offers: list[tuple[list[str], np.ndarray, np.ndarray]] = []
        self.closed = False

    def offer(self, symbols: list[str], event_ns: np.ndarray, values: np.ndarray) -> None:
        """Record one offer."""
        self.offers.append((symbols, event_ns.copy(), values.copy()))

    def close(self) -> None:
        """Mark closed."""
        self.closed = True
