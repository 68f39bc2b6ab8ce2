"""The newest ready feature row per symbol: for the HTTP API, handed on to the online store."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from features.engine import FeatureEngine
from features.kernels import keep_latest

# how often the newest feature rows are handed to the online writer (which flushes
# every TICKSERVE_ONLINE_FLUSH_S itself)
OFFER_INTERVAL_S = 0.025


class RowWriter(Protocol):
    """Takes the newest rows of some symbols (`features.online.OnlineWriter`)."""

    def offer(self, symbols: list[str], event_ns: np.ndarray, values: np.ndarray) -> None:
        """Keep these rows for the next write."""


class LatestRows:
    """Per feature slot of `engine`: its newest ready row and that row's event time.

    `publish` takes a micro-batch's rows in one Numba pass; the rows updated since the
    last offer go to `writer` at most every `interval_s` (the writer keeps only the
    newest row per symbol anyway, and a Python list per micro-batch would cost more
    than the rest of the bookkeeping together).
    """

    def __init__(
        self,
        engine: FeatureEngine,
        writer: RowWriter | None = None,
        interval_s: float = OFFER_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Nothing kept yet; `writer` None keeps the rows for `latest` only."""
        self.engine = engine
        self.writer = writer
        self.interval_s = interval_s
        self._clock = clock
        self._event_ns = np.full(0, -1, np.int64)  # -1: no ready row yet
        self._values = np.zeros((0, engine.spec.n_features))
        self._unoffered = np.zeros(0, np.bool_)  # slots updated since the last offer
        self._last_offer = 0.0

    def publish(
        self, event_ns: np.ndarray, values: np.ndarray, ready: np.ndarray, slots: np.ndarray
    ) -> None:
        """Keep the newest ready row of each slot of a batch, and offer when due."""
        pad = self.engine.fstate.shape[0] - self._event_ns.shape[0]
        if pad > 0:  # the engine grew its slots: grow alike
            self._event_ns = np.concatenate([self._event_ns, np.full(pad, -1, np.int64)])
            self._values = np.concatenate([self._values, np.zeros((pad, values.shape[1]))])
            self._unoffered = np.concatenate([self._unoffered, np.zeros(pad, np.bool_)])
        keep_latest(slots, event_ns, values, ready, self._event_ns, self._values, self._unoffered)
        self.offer(force=False)

    def offer(self, force: bool) -> None:
        """Hand the rows updated since the last offer to the writer (when due or `force`)."""
        now = self._clock()
        if self.writer is None or not (force or now - self._last_offer >= self.interval_s):
            return
        self._last_offer = now
        slots = np.flatnonzero(self._unoffered)
        if not slots.size:
            return
        self._unoffered[slots] = False
        names: Sequence[str] = self.engine.symbols
        self.writer.offer(
            [names[s] for s in slots.tolist()], self._event_ns[slots], self._values[slots]
        )

    def latest(self, symbol: str) -> tuple[int, np.ndarray] | None:
        """The newest ready feature row of `symbol` and its event time, None if none yet."""
        slot = self.engine.slot_of.get(symbol)
        if slot is None or slot >= self._event_ns.shape[0] or self._event_ns[slot] < 0:
            return None
        return int(self._event_ns[slot]), self._values[slot].copy()
