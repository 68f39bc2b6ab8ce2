"""GPU seconds a training run held, from NVML (nvidia-ml-py) where the machine has one.

A GPU is paid for while it is held: a run's GPU seconds are its wall time on every
GPU where this process holds a compute context when the run is priced. Without
NVML (no driver, no nvidia-ml-py) or without a context of ours, they are 0 and the
reason says why. NVML lists host process ids: inside a container with its own pid
namespace our context is not found, and that is the reason given.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class GpuUsage:
    """GPU seconds and, when they are 0, why ("" when measured)."""

    seconds: float
    reason: str = ""


class GpuClock:
    """Started with the run; `read` asks NVML which GPUs this process holds."""

    def __init__(self) -> None:
        """Start the clock."""
        self.started = time.perf_counter()
        self.pid = os.getpid()

    def read(self) -> GpuUsage:
        """GPU seconds so far (never raises: a missing NVML is a reason, not an error)."""
        try:
            import pynvml
        except ImportError:
            return GpuUsage(0.0, "nvidia-ml-py is not installed")
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            return GpuUsage(0.0, f"NVML is not available: {exc}")
        try:
            held = self._held(pynvml)
        except pynvml.NVMLError as exc:
            return GpuUsage(0.0, f"NVML query failed: {exc}")
        finally:
            pynvml.nvmlShutdown()
        if isinstance(held, str):
            return GpuUsage(0.0, held)
        return GpuUsage(held * (time.perf_counter() - self.started))

    def _held(self, nvml: Any) -> int | str:
        """How many GPUs hold a compute context of this process, or why none."""
        count = nvml.nvmlDeviceGetCount()
        held = 0
        for index in range(count):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            held += any(p.pid == self.pid for p in processes)
        if not held:
            return f"this process holds no GPU ({count} visible)"
        return held
