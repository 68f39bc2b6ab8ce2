"""Training cost: GPU seconds from NVML (or 0 and why), per-model costs read back from MLflow."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import orjson
import pandas as pd
import pytest
from prometheus_client import REGISTRY

from deploy.costs import export
from deploy.settings import Settings
from features.spec import FeatureSpec
from tests.helpers import ROOT, TRADES, unique
from training.cost import COST_METRIC, ModelCosts, model_costs
from training.dataset import build_dataset
from training.params import SplitParams, TrainParams
from training.train import train_and_register

SPEC = FeatureSpec()


def test_a_run_without_a_gpu_has_zero_gpu_seconds_and_says_why() -> None:
    """In a fresh process (no CUDA context of its own): 0, and the reason is logged."""
    code = (
        "from tickserve.logs import setup_logging; setup_logging(); "
        "from training.cost import CostMeter; from training.params import CostParams; "
        "print(CostMeter(CostParams()).read().gpu_seconds)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True, cwd=ROOT)  # fmt: skip
    assert float(done.stdout) == 0.0
    logged = [orjson.loads(line) for line in done.stderr.splitlines()]
    [reason] = [d["reason"] for d in logged if d["msg"] == "gpu_seconds is 0"]
    assert reason  # no NVML, or NVML sees no GPU held by this process


@pytest.mark.services
def test_model_costs_read_the_newest_run_and_the_month(stack_settings: Settings) -> None:
    from mlflow.tracking import MlflowClient

    uri, name = stack_settings.mlflow_uri, unique("cost-test")
    assert model_costs(uri, name) == ModelCosts(0.0, 0.0, 0.0)  # no version yet
    raw = pd.read_parquet(TRADES)
    ticks = pd.DataFrame({
        "symbol": "XRP/ETH", "event_ns": raw["timestamp"].to_numpy(np.int64) * 1_000_000,
        "price": raw["price"], "quantity": raw["amount"], "is_buy": raw["side"] == "buy",
    })  # fmt: skip
    dataset = build_dataset(ticks, SPEC)
    params = TrainParams(splits=SplitParams(n_folds=3))
    runs = [train_and_register(dataset, SPEC, uri, name, params=params).run_id for _ in range(2)]
    client = MlflowClient(tracking_uri=uri)
    cost = [client.get_run(run).data.metrics[COST_METRIC] for run in runs]
    costs = model_costs(uri, name)
    assert costs.last_run_usd == cost[1] > 0
    assert costs.month_to_date_usd == pytest.approx(sum(cost))
    assert costs.last_run_gpu_seconds == client.get_run(runs[1]).data.metrics["gpu_seconds"]
    export(name, costs)
    assert REGISTRY.get_sample_value("training_cost_usd_last_run", {"model": name}) == cost[1]
    month = REGISTRY.get_sample_value("training_cost_usd_month_to_date", {"model": name})
    assert month == pytest.approx(sum(cost))
