"""Cost of training runs: measured wall/CPU time, priced per hour, checked against a budget."""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass

from tickserve.errors import BudgetExceeded, RegistryError
from training.gpu_time import GpuClock
from training.params import CostParams

logger = logging.getLogger(__name__)

COST_METRIC = "cost_usd"


@dataclass(frozen=True, slots=True)
class RunCost:
    """What one run used and what that costs."""

    wall_seconds: float
    cpu_seconds: float
    gpu_seconds: float
    cost_usd: float

    def metrics(self) -> dict[str, float]:
        """As MLflow metrics."""
        return {
            "wall_seconds": self.wall_seconds,
            "cpu_seconds": self.cpu_seconds,
            "gpu_seconds": self.gpu_seconds,
            COST_METRIC: self.cost_usd,
        }


class CostMeter:
    """Measures wall, process CPU and GPU time (`training.gpu_time`) from construction."""

    def __init__(self, prices: CostParams):
        """Start measuring."""
        self.prices = prices
        self.wall0 = time.perf_counter()
        self.cpu0 = time.process_time()
        self.gpu = GpuClock()

    def read(self, gpu_seconds: float | None = None) -> RunCost:
        """Usage so far, priced: the machine by wall time, the GPU by its own time.

        `gpu_seconds` None: measured through NVML (0, with the reason logged, where
        this process used no GPU).
        """
        if gpu_seconds is None:
            usage = self.gpu.read()
            gpu_seconds = usage.seconds
            if usage.reason:
                logger.info("gpu_seconds is 0", extra={"reason": usage.reason})
        wall = time.perf_counter() - self.wall0
        cpu = time.process_time() - self.cpu0
        prices = self.prices
        cost = (wall * prices.cpu_hour_usd + gpu_seconds * prices.gpu_hour_usd) / 3600
        return RunCost(wall, cpu, gpu_seconds, cost)


def month_start_ms(now: dt.datetime | None = None) -> int:
    """Start of the current UTC month in epoch ms."""
    now = now or dt.datetime.now(dt.UTC)
    return int(dt.datetime(now.year, now.month, 1, tzinfo=dt.UTC).timestamp() * 1000)


def month_cost(tracking_uri: str) -> float:
    """Sum of `cost_usd` over every run of every experiment started this UTC month.

    Raises:
        RegistryError: The tracking store failed to answer.
    """
    from mlflow.exceptions import MlflowException

    try:
        return _month_cost(tracking_uri)
    except MlflowException as exc:
        message = f"reading this month's run costs from {tracking_uri} failed: {exc.message}"
        raise RegistryError(message) from exc


def _month_cost(tracking_uri: str) -> float:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    total, token = 0.0, None
    while ids:
        page = client.search_runs(
            ids,
            f"attributes.start_time >= {month_start_ms()}",
            ViewType.ALL,
            max_results=1000,
            page_token=token,
        )
        total += sum(r.data.metrics.get(COST_METRIC, 0.0) for r in page)
        token = page.token
        if not token:
            break
    return total


@dataclass(frozen=True, slots=True)
class ModelCosts:
    """What training a registered model cost: its newest version's run, and this month."""

    last_run_usd: float
    last_run_gpu_seconds: float
    month_to_date_usd: float


def model_costs(tracking_uri: str, model_name: str) -> ModelCosts:
    """Costs of the runs that registered versions of `model_name` (zeros: none yet).

    The last run is the newest version's; the month sums the runs of every version
    created this UTC month.

    Raises:
        RegistryError: The tracking store failed to answer.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    since = month_start_ms()
    try:
        versions = [v for v in client.search_model_versions(f"name = '{model_name}'") if v.run_id]
        if not versions:
            return ModelCosts(0.0, 0.0, 0.0)
        newest = max(versions, key=lambda v: int(v.version))
        wanted = [v for v in versions if (v.creation_timestamp or 0) >= since or v is newest]
        metrics = {v.run_id: client.get_run(str(v.run_id)).data.metrics for v in wanted}
    except MlflowException as exc:
        message = f"reading the training costs of {model_name} failed: {exc.message}"
        raise RegistryError(message) from exc
    month = sum(
        metrics[v.run_id].get(COST_METRIC, 0.0)
        for v in wanted
        if (v.creation_timestamp or 0) >= since
    )
    last = metrics[newest.run_id]
    return ModelCosts(last.get(COST_METRIC, 0.0), last.get("gpu_seconds", 0.0), month)


def check_budget(tracking_uri: str, prices: CostParams) -> float:
    """Raise BudgetExceeded once this month's logged cost exceeds the budget; else return it."""
    spent = month_cost(tracking_uri)
    if spent > prices.monthly_budget_usd:
        raise BudgetExceeded(
            f"this month's training runs cost ${spent:.4f}, over the monthly budget of "
            f"${prices.monthly_budget_usd:.4f} (train.cost.monthly_budget_usd in params.yaml): "
            "not starting"
        )
    return spent
