"""FeatureEngine: symbol slots, preallocated state, and the one entry point online and offline."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from features import kernels
from features.spec import FeatureSpec
from tickserve.progress import progress_bar

logger = logging.getLogger(__name__)

FULL = -1  # the slot `FeatureEngine.slots` gives a new symbol once max_symbols are taken
OFFLINE_CHUNK_TICKS = 1_000_000  # per kernel call offline: progress steps, no measurable cost


@dataclass(frozen=True, slots=True)
class FeatureBatch:
    """Feature rows for one micro-batch, aligned with its ticks."""

    values: np.ndarray  # (n, n_features) float64, NaN where not ready
    ready: np.ndarray  # (n,) bool: every window full, safe to score
    status: np.ndarray  # (n,) int8: kernels.STATUS_OK or STATUS_LATE


class FeatureEngine:
    """Per-symbol streaming state for one `FeatureSpec`; growable up to `max_symbols`.

    The stream worker and the offline path (`compute_features`) both call `update`,
    so a value computed live is the value training saw.
    """

    def __init__(self, spec: FeatureSpec, max_symbols: int = 10_000, initial_symbols: int = 64):
        """Allocate state for `initial_symbols`, doubling on demand up to `max_symbols`."""
        self.spec = spec
        self.max_symbols = max_symbols
        self.slot_of: dict[str, int] = {}
        self.symbols: list[str] = []
        capacity = min(initial_symbols, max_symbols)
        self.fstate = np.zeros((capacity, kernels.N_FSTATE), np.float64)
        self.istate = np.zeros((capacity, kernels.N_ISTATE), np.int64)
        self.istate[:, kernels.I_BAR] = -1
        self.rings = np.zeros((capacity, kernels.N_RINGS, spec.history), np.float64)
        self.iparams = np.array(
            [
                spec.bar_ns,
                spec.late_tolerance_ns,
                *spec.short_return_bars,
                spec.return_bars,
                spec.rsi_period,
                spec.bb_period,
                spec.volume_bars,
                spec.rv_bars,
                spec.ema_fast,
                spec.ema_slow,
            ],
            np.int64,
        )
        assert self.iparams.shape == (kernels.N_IPARAMS,)

    def _grow(self) -> None:
        old = self.fstate.shape[0]
        new = min(old * 2, self.max_symbols)
        self.fstate = np.concatenate([self.fstate, np.zeros((new - old, kernels.N_FSTATE))])
        istate = np.zeros((new - old, kernels.N_ISTATE), np.int64)
        istate[:, kernels.I_BAR] = -1
        self.istate = np.concatenate([self.istate, istate])
        rings = np.zeros((new - old, kernels.N_RINGS, self.spec.history))
        self.rings = np.concatenate([self.rings, rings])
        logger.info("feature state grown", extra={"symbols": new})

    def reset(self, symbols: Sequence[str]) -> None:
        """Forget what these symbols have seen (they keep their slots), as if new.

        For a rebuild from the start of a log: state built from other records (a log
        that is gone) would make the log's own ticks look late.
        """
        slots = [self.slot_of[s] for s in symbols if s in self.slot_of]
        self.fstate[slots] = 0.0
        self.istate[slots] = 0
        self.istate[slots, kernels.I_BAR] = -1
        self.rings[slots] = 0.0

    @property
    def full(self) -> bool:
        """Every one of the `max_symbols` slots is taken."""
        return len(self.symbols) >= self.max_symbols

    def slots(self, symbols: Sequence[str]) -> np.ndarray:
        """Slot per symbol, assigning new slots to symbols seen for the first time.

        Once `max_symbols` symbols hold slots, a new symbol gets -1 (FULL): what
        producers send must not take the process down, so the caller decides what
        becomes of its ticks (the worker dead-letters them with reason ``capacity``).
        """
        out = np.empty(len(symbols), np.int64)
        slot_of = self.slot_of
        for i, symbol in enumerate(symbols):
            slot = slot_of.get(symbol)
            if slot is None:
                slot = len(self.symbols)
                if slot >= self.max_symbols:
                    out[i] = FULL
                    continue
                if slot >= self.fstate.shape[0]:
                    self._grow()
                slot_of[symbol] = slot
                self.symbols.append(symbol)
            out[i] = slot
        return out

    def update(
        self,
        slots: np.ndarray,
        event_ns: np.ndarray,
        price: np.ndarray,
        quantity: np.ndarray,
        is_buy: np.ndarray,
        out: FeatureBatch | None = None,
    ) -> FeatureBatch:
        """Apply ticks in order; return one feature row per tick (written into `out` if given)."""
        if out is None:
            n = slots.shape[0]
            out = FeatureBatch(
                np.empty((n, self.spec.n_features), np.float64),
                np.empty(n, np.bool_),
                np.empty(n, np.int8),
            )
        kernels.update_batch(
            slots,
            event_ns,
            price,
            quantity,
            is_buy,
            self.fstate,
            self.istate,
            self.rings,
            self.iparams,
            self.spec.bb_k,
            out.values,
            out.ready,
            out.status,
        )
        return out


def warm_up(spec: FeatureSpec) -> None:
    """Load (or compile) the kernels now, so the first micro-batch does not pay for it.

    Loading the cached machine code costs about a second of CPU on first call;
    a worker calls this before it joins its consumer group.
    """
    engine = FeatureEngine(spec, max_symbols=1, initial_symbols=1)
    one = np.zeros(1, np.int64)
    slots = engine.slots(["warm-up"])
    batch = engine.update(slots, one, np.ones(1), np.ones(1), np.ones(1, np.bool_))
    latest = np.zeros((1, spec.n_features))
    kernels.keep_latest(
        slots, one, batch.values, batch.ready, one.copy(), latest, np.zeros(1, np.bool_)
    )


def compute_features(
    spec: FeatureSpec,
    symbols: Sequence[str],
    event_ns: np.ndarray,
    price: np.ndarray,
    quantity: np.ndarray,
    is_buy: np.ndarray,
    progress: bool = False,
    chunk_ticks: int = OFFLINE_CHUNK_TICKS,
) -> FeatureBatch:
    """Offline entry point: the streaming kernels over a whole history.

    The history goes through the kernels `chunk_ticks` at a time only so that a
    progress bar can advance: state carries from one call to the next, so the rows
    equal those of a single call bit for bit (tested).
    """
    engine = FeatureEngine(spec, max_symbols=max(len(set(symbols)), 1))
    slots = engine.slots(symbols)
    event_ns = np.ascontiguousarray(event_ns, np.int64)
    price = np.ascontiguousarray(price, np.float64)
    quantity = np.ascontiguousarray(quantity, np.float64)
    is_buy = np.ascontiguousarray(is_buy, np.bool_)
    n = len(slots)
    out = FeatureBatch(
        np.empty((n, spec.n_features), np.float64), np.empty(n, np.bool_), np.empty(n, np.int8)
    )
    with progress_bar("features", total=n, unit=" ticks", enabled=progress) as bar:
        for start in range(0, n, chunk_ticks):
            stop = min(start + chunk_ticks, n)
            part = slice(start, stop)
            engine.update(
                slots[part],
                event_ns[part],
                price[part],
                quantity[part],
                is_buy[part],
                FeatureBatch(out.values[part], out.ready[part], out.status[part]),
            )
            bar.update(stop - start)
    return out
