"""The stream worker and its parts: commits, recovery, dead letters, shadow scoring."""

from __future__ import annotations

from stream.worker.worker import FeatureTap, StreamWorker, WorkerConfig

__all__ = ["FeatureTap", "StreamWorker", "WorkerConfig"]
