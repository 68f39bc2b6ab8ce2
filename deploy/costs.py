"""Training cost gauges of the serving process, refreshed from MLflow off the hot path."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import Gauge

from tickserve.errors import RegistryError
from training.cost import ModelCosts, model_costs

logger = logging.getLogger(__name__)

REFRESH_S = 60.0  # runs change when someone trains: a minute old is fresh enough

LAST_RUN_USD = Gauge(
    "training_cost_usd_last_run", "Cost of the run behind the newest model version", ["model"]
)
MONTH_USD = Gauge(
    "training_cost_usd_month_to_date",
    "Cost of the runs behind the model's versions created this UTC month",
    ["model"],
)
LAST_RUN_GPU_SECONDS = Gauge(
    "training_gpu_seconds_last_run", "GPU seconds of the run behind the newest version", ["model"]
)


def export(model: str, costs: ModelCosts) -> None:
    """Set the three gauges of `model`."""
    LAST_RUN_USD.labels(model).set(costs.last_run_usd)
    MONTH_USD.labels(model).set(costs.month_to_date_usd)
    LAST_RUN_GPU_SECONDS.labels(model).set(costs.last_run_gpu_seconds)


async def refresh_costs(
    tracking_uri: str, model: str, stop: asyncio.Event, every_s: float = REFRESH_S
) -> None:
    """Read `model`'s training costs in a thread every `every_s` until `stop` is set."""
    while not stop.is_set():
        try:
            export(model, await asyncio.to_thread(model_costs, tracking_uri, model))
        except RegistryError as exc:  # the registry may be briefly away: keep the last values
            logger.warning("training costs not read", extra={"detail": str(exc)})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
