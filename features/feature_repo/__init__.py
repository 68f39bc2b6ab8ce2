"""The Feast feature repository: entity `symbol`, FeatureView `crypto_ohlcv_features`."""
