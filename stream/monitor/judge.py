"""Judge: micro-batch summaries in, per-key count deltas out (what the faust tables add up)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from stream.contracts.summary import BatchSummary
from stream.monitor.quality import PendingTicks, bin_counts
from stream.monitor.reference import Reference

# (model, version, symbol)
CallKey = tuple[str, str, str]


@dataclass(slots=True)
class Deltas:
    """What a run of summaries adds to the monitor's tables.

    Attributes:
        calls: (model, version, symbol) -> [hits, judged calls].
        bins: feature name -> counts over the reference's bins (reference version only).
        ticks: Ticks seen.
    """

    calls: dict[CallKey, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    bins: dict[str, np.ndarray] = field(default_factory=dict)
    ticks: int = 0


class Judge:
    """Joins each call with its symbol's realized direction, and bins the scored features.

    Holds one `PendingTicks` per symbol: the open calls and the prices after them.
    Those are rebuilt from the stream, not stored: after a restart the calls that
    were open at the stop are not judged (the totals so far are kept by the tables).
    """

    def __init__(self, bar_ns: int, horizon_bars: int = 1) -> None:
        """Judge on bars of `bar_ns` with the label horizon `horizon_bars`."""
        self.bar_ns = bar_ns
        self.horizon_bars = horizon_bars
        self.pending: dict[str, PendingTicks] = {}
        self._versions: list[tuple[str, str]] = []
        self._codes: dict[tuple[str, str], int] = {}

    def set_horizon(self, horizon_bars: int) -> None:
        """Judge calls from now on with another horizon (a new version's)."""
        self.horizon_bars = horizon_bars
        for pending in self.pending.values():
            pending.horizon_bars = horizon_bars

    def add(self, summaries: list[BatchSummary], reference: Reference | None) -> Deltas:
        """The deltas of `summaries` (in stream order); PSI bins only for `reference`'s version."""
        deltas = Deltas()
        for summary in summaries:
            deltas.ticks += len(summary)
            self._judge(summary, deltas)
            if (
                reference is not None
                and summary.model == reference.model
                and summary.version == reference.version
            ):
                self._bin(summary, reference, deltas)
        return deltas

    def _code(self, model: str, version: str) -> int:
        key = (model, version)
        code = self._codes.get(key)
        if code is None:
            code = self._codes[key] = len(self._versions)
            self._versions.append(key)
        return code

    def _judge(self, summary: BatchSummary, deltas: Deltas) -> None:
        code = self._code(summary.model, summary.version)
        order = np.argsort(summary.symbol_index, kind="stable")
        index = summary.symbol_index[order]
        bounds = np.flatnonzero(np.diff(index)) + 1
        for rows in np.split(order, bounds) if len(order) else ():
            symbol = summary.symbols[int(summary.symbol_index[rows[0]])]
            pending = self.pending.get(symbol)
            if pending is None:
                pending = self.pending[symbol] = PendingTicks(self.bar_ns, self.horizon_bars)
            resolved = pending.add(
                summary.event_ns[rows], summary.price[rows], summary.direction[rows], code
            )
            if not len(resolved):
                continue
            hits = np.bincount(resolved.version, weights=resolved.hit)
            calls = np.bincount(resolved.version)
            for c in np.flatnonzero(calls).tolist():
                model, version = self._versions[c]
                counts = deltas.calls[(model, version, symbol)]
                counts[0] += int(hits[c])
                counts[1] += int(calls[c])

    @staticmethod
    def _bin(summary: BatchSummary, reference: Reference, deltas: Deltas) -> None:
        names = list(reference.edges)
        features = summary.features
        if features.shape[1] != len(names):
            return  # another feature set: nothing comparable
        for j, name in enumerate(names):
            counts = bin_counts(reference.edges[name], features[:, j].astype(np.float64))
            if name in deltas.bins:
                deltas.bins[name] += counts
            else:
                deltas.bins[name] = counts
