"""Scheduling of the thread that runs the stream: real-time priority or short slice (opt-in)."""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys

from tickserve.errors import ConfigError

logger = logging.getLogger(__name__)


def realtime_priority(priority: int) -> None:
    """Run the calling thread under SCHED_FIFO at `priority` (1-99); 0 leaves it alone.

    Only this thread changes: threads started before keep the normal scheduler, threads
    it starts afterwards inherit the policy (Linux's default). The kernel still caps
    real-time threads at `sched_rt_runtime_us` of every `sched_rt_period_us` (95% by
    default), so a runaway loop cannot take a core away for good.

    >>> realtime_priority(0)  # a no-op
    """
    if priority <= 0:
        return
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except PermissionError as exc:
        raise ConfigError(
            f"TICKSERVE_REALTIME_PRIORITY={priority} needs CAP_SYS_NICE (root, or the "
            f"capability in the pod's securityContext): {exc}"
        ) from exc
    logger.info("real-time scheduling", extra={"policy": "SCHED_FIFO", "priority": priority})


# sched_setattr(2) and sched_getattr(2) by machine; Python's os module has neither
_SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}
SLICE_RANGE_US = (100, 100_000)  # what the kernel accepts (it clamps to 0.1-100 ms)


class _SchedAttr(ctypes.Structure):
    """`struct sched_attr` (include/uapi/linux/sched/types.h), version 1: 56 bytes."""

    _fields_ = [
        ("size", ctypes.c_uint32), ("policy", ctypes.c_uint32), ("flags", ctypes.c_uint64),
        ("nice", ctypes.c_int32), ("priority", ctypes.c_uint32), ("runtime", ctypes.c_uint64),
        ("deadline", ctypes.c_uint64), ("period", ctypes.c_uint64),
        ("util_min", ctypes.c_uint32), ("util_max", ctypes.c_uint32),
    ]  # fmt: skip


def _syscall(which: int, attr: _SchedAttr, *extra: int) -> None:
    """sched_setattr (`which` 0) or sched_getattr (1) on the calling thread."""
    calls = _SYSCALLS.get(platform.machine())
    if sys.platform != "linux" or calls is None:
        raise ConfigError(
            f"TICKSERVE_SCHED_SLICE_US needs Linux on {' or '.join(_SYSCALLS)}, "
            f"not {sys.platform} on {platform.machine()}"
        )
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(calls[which], 0, ctypes.byref(attr), *extra) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def _get() -> _SchedAttr:
    attr = _SchedAttr()
    _syscall(1, attr, ctypes.sizeof(attr), 0)
    return attr


def slice_ns() -> int:
    """The calling thread's fair-scheduler slice as the kernel reports it (0 before 6.12)."""
    return int(_get().runtime)


def time_slice(slice_us: int) -> None:
    """Ask the fair scheduler for a `slice_us` time slice for the calling thread; 0: leave it.

    Linux 6.12's EEVDF scheduler takes a thread's requested slice as a latency hint:
    a thread that wakes with a short slice gets an early virtual deadline, so it may
    preempt a CPU-bound neighbour (the broker, another pod's batch job) where the
    default slice (1.4 ms on this 2-core VM, longer with more CPUs) would leave it queued.
    Unlike `realtime_priority` it needs no privilege and cannot starve anything: the
    thread's share of the CPU stays the same, it is only served sooner and in shorter
    turns. Threads started afterwards inherit it, as with the scheduling policy. What
    it was measured to do here is in the README ("Where it stands"): no clear effect
    yet, so it is off by default.

    >>> time_slice(0)  # a no-op
    """
    if slice_us <= 0:
        return
    low, high = SLICE_RANGE_US
    if not low <= slice_us <= high:
        raise ConfigError(f"TICKSERVE_SCHED_SLICE_US={slice_us} is outside {low}-{high}")
    try:
        attr = _get()  # keep the thread's policy and nice
        if attr.policy not in (os.SCHED_OTHER, os.SCHED_BATCH):
            raise ConfigError(
                f"TICKSERVE_SCHED_SLICE_US applies to the fair scheduler; this thread's "
                f"policy is {attr.policy} (set TICKSERVE_REALTIME_PRIORITY=0)"
            )
        attr.size, attr.runtime = ctypes.sizeof(attr), slice_us * 1000
        _syscall(0, attr, 0)
        granted = slice_ns()
    except OSError as exc:
        raise ConfigError(f"TICKSERVE_SCHED_SLICE_US={slice_us}: {exc}") from exc
    if granted != attr.runtime:  # kernels before 6.12 ignore it for fair threads
        raise ConfigError(
            f"TICKSERVE_SCHED_SLICE_US={slice_us} needs Linux 6.12 or later (EEVDF "
            f"custom slices); this kernel is {platform.release()}"
        )
    logger.info("scheduler time slice", extra={"policy": "SCHED_OTHER", "slice_us": slice_us})
