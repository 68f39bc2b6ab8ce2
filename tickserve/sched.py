"""Scheduling of the thread that runs the stream: real-time priority (opt-in)."""

from __future__ import annotations

import logging
import os

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
