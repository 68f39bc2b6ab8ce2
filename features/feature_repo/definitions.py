"""Feast objects for the online store; `feast apply` here and `features.online` share them."""

from __future__ import annotations

from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Float64

from features.spec import FeatureSpec

FEATURE_VIEW = "crypto_ohlcv_features"
PUSH_SOURCE = "crypto_ohlcv_push"

symbol = Entity(name="symbol", join_keys=["symbol"], value_type=ValueType.STRING)

# The offline half is the ClickHouse archive (training reads it directly); Feast
# requires a batch source behind a push source, so it gets an empty file path.
_batch = FileSource(
    name="crypto_ohlcv_batch",
    path="crypto_ohlcv_features.parquet",
    timestamp_field="event_timestamp",
)

crypto_ohlcv_push = PushSource(name=PUSH_SOURCE, batch_source=_batch)

crypto_ohlcv_features = FeatureView(
    name=FEATURE_VIEW,
    entities=[symbol],
    ttl=timedelta(days=1),
    schema=[Field(name=name, dtype=Float64) for name in FeatureSpec().names],
    source=crypto_ohlcv_push,
    online=True,
)
