"""tickserve: low-latency streaming inference for trading models."""

from __future__ import annotations

__version__ = "0.1.0"
