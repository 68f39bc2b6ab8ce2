"""FeatureSpec: what the features are, in which order, and a stable hash models are bound to."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import orjson

NS_PER_SECOND = 1_000_000_000


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """The contract between the stream, the online store and every model.

    A model records `spec.hash` at training time; the worker refuses a model whose
    hash differs from its own spec's, because the same column order with other
    windows or another bar length would score silently wrong.

    Attributes:
        bar_ns: Time-bar length in ns.
        return_bars: Bars back for `return_24h` (log return).
        rsi_period: Wilder RSI period for `rsi_14`.
        bb_period: Bollinger window for `bb_pos_20` (population std, k=bb_k).
        bb_k: Bollinger band width in standard deviations.
        vol_bars: Completed bars averaged for `vol_ratio_24`.
        late_tolerance_ns: A tick this far before its symbol's open bar still counts
            (into the open bar); an older one is rejected as `late`.
        version: Bumped whenever a kernel's arithmetic changes.
    """

    bar_ns: int = 60 * NS_PER_SECOND
    return_bars: int = 24
    rsi_period: int = 14
    bb_period: int = 20
    bb_k: float = 2.0
    vol_bars: int = 24
    late_tolerance_ns: int = 2 * NS_PER_SECOND
    version: int = 1

    names: tuple[str, ...] = ("return_24h", "rsi_14", "bb_pos_20", "vol_ratio_24")
    dtype: str = "float64"

    @property
    def n_features(self) -> int:
        """How many feature columns a row has."""
        return len(self.names)

    @property
    def history(self) -> int:
        """Completed bars each symbol keeps in its ring buffer."""
        return max(self.return_bars, self.bb_period, self.vol_bars) + 1

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
