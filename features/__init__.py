"""Streaming features: FeatureSpec, Numba kernels over micro-batches, the online store."""
