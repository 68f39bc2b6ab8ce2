"""Limits that the stream and the HTTP API share, so that both accept the same input."""

from __future__ import annotations

# longest symbol accepted, in characters: a tick on the stream and `POST /predict` alike
MAX_SYMBOL_LEN = 64
