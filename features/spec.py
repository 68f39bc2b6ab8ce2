"""FeatureSpec: what the features are, in which order, and a stable hash models are bound to."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import orjson

NS_PER_SECOND = 1_000_000_000

# Column order of every feature row (kernels.update_batch writes them in this order).
# Windows are in bars; the names are the user's (`return_24h` is 24 bars: 24 hours
# with TICKSERVE_BAR_SECONDS=3600, 24 minutes with the default 60).
FEATURE_NAMES = (
    "return_1",
    "return_5",
    "return_24h",
    "rsi_14",
    "bb_pos_20",
    "vol_ratio_24",
    "realized_vol_24",
    "ema_12_dev",
    "macd_12_26",
    "vwap_dev_24",
    "flow_imbalance_24",
    "time_since_trade",
)


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """The contract between the stream, the online store and every model.

    A model records `spec.hash` at training time; the worker refuses a model whose
    hash differs from its own spec's, because the same column order with other
    windows or another bar length would score silently wrong.

    Attributes:
        bar_ns: Time-bar length in ns.
        short_return_bars: Bars back for `return_1` and `return_5` (log returns).
        return_bars: Bars back for `return_24h`.
        rsi_period: Wilder RSI period (TA-Lib seeding: mean of the first changes).
        bb_period: Bollinger window (population std, like TA-Lib) for `bb_pos_20`.
        bb_k: Bollinger band width in standard deviations.
        volume_bars: Completed bars behind `vol_ratio_24`, `vwap_dev_24`, `flow_imbalance_24`.
        rv_bars: One-bar log returns in `realized_vol_24` (population std).
        ema_fast: Fast EMA period (TA-Lib: seeded with the simple mean).
        ema_slow: Slow EMA period.
        late_tolerance_ns: A tick this far before its symbol's open bar still counts
            (into the open bar); an older one is rejected as `late`.
        version: Bumped whenever a kernel's arithmetic changes.
    """

    bar_ns: int = 60 * NS_PER_SECOND
    short_return_bars: tuple[int, int] = (1, 5)
    return_bars: int = 24
    rsi_period: int = 14
    bb_period: int = 20
    bb_k: float = 2.0
    volume_bars: int = 24
    rv_bars: int = 24
    ema_fast: int = 12
    ema_slow: int = 26
    late_tolerance_ns: int = 2 * NS_PER_SECOND
    version: int = 2

    names: tuple[str, ...] = FEATURE_NAMES
    dtype: str = "float64"

    @property
    def n_features(self) -> int:
        """How many feature columns a row has."""
        return len(self.names)

    @property
    def history(self) -> int:
        """Completed bars each symbol keeps in its ring buffers."""
        longest = max(*self.short_return_bars, self.return_bars, self.bb_period)
        return max(longest, self.volume_bars, self.rv_bars) + 1

    @property
    def hash(self) -> str:
        """Stable short hash of every field (sorted JSON, sha256, 16 hex digits).

        >>> FeatureSpec().hash == FeatureSpec().hash
        True
        >>> FeatureSpec().hash != FeatureSpec(bar_ns=1).hash
        True
        """
        canonical = orjson.dumps(asdict(self), option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(canonical).hexdigest()[:16]
