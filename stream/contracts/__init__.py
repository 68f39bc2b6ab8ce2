"""Tick and signal contracts and their columnar codecs."""
