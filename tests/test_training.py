"""Training on real trades into the real MLflow store: folds, metrics, artifacts, gate, budget."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from deploy.settings import Settings
from features.spec import FeatureSpec
from inference.registry import SPEC_HASH_TAG, fluent_mlflow
from tests.helpers import TRADES, tickserve, unique
from tickserve.errors import BudgetExceeded, ConfigError, ModelRejected
from training.cost import check_budget, month_cost
from training.dataset import Dataset, build_dataset
from training.gate import validate_version
from training.models import check_parity, export_onnx, make_model
from training.params import CostParams, GateParams, SplitParams, TrainParams, parse_params
from training.train import train_and_register

pytestmark = pytest.mark.services
SPEC = FeatureSpec()
PARAMS = TrainParams(splits=SplitParams(n_folds=3))


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    raw = pd.read_parquet(TRADES)
    ticks = pd.DataFrame({
        "symbol": "XRP/ETH", "event_ns": raw["timestamp"].to_numpy(np.int64) * 1_000_000,
        "price": raw["price"], "quantity": raw["amount"], "is_buy": raw["side"] == "buy",
    })  # fmt: skip
    return build_dataset(ticks, SPEC)


@pytest.fixture(scope="module")
def model_name(stack_settings: Settings) -> str:
    return unique("gate-test")


def _client(settings: Settings):  # type: ignore[no-untyped-def]
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=settings.mlflow_uri, registry_uri=settings.mlflow_uri)


@pytest.mark.parametrize("model_type", ["logistic", "hgb"])
def test_a_run_logs_what_the_issue_asks_for(
    stack_settings: Settings, dataset: Dataset, model_type: str, tmp_path: Path
) -> None:
    import mlflow

    name = unique(f"train-{model_type}")
    params = replace(PARAMS, model_type=model_type)
    result = train_and_register(
        dataset, SPEC, stack_settings.mlflow_uri, name, alias=None, params=params,
        provenance={"git_commit": "abc123", "dvc_data_hash": "none"}, figures_dir=tmp_path,
    )  # fmt: skip
    np.testing.assert_allclose(result.onnx_scores, result.native_scores, rtol=0, atol=1e-5)
    client = _client(stack_settings)
    run = client.get_run(result.run_id)
    assert run.info.run_name == f"{model_type}_{result.version}"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "tickserve/XRP_ETH"
    p = run.data.params
    assert p["model_type"] == model_type and p[SPEC_HASH_TAG] == SPEC.hash
    assert p["git_commit"] == "abc123" and int(p["data_start_ns"]) < int(p["test_start_ns"])
    assert int(p["train_rows"]) > 0 and int(p["val_rows"]) > 0 and int(p["test_rows"]) > 0
    m = run.data.metrics
    for key in ("accuracy", "log_loss", "auc", "sharpe", "max_drawdown"):
        assert np.isfinite(m[f"val_{key}"]) and np.isfinite(m[f"test_{key}"]), key
    assert 0.3 < m["test_accuracy"] < 0.7  # a real model on real data, not a faked figure
    assert m["wall_seconds"] > 0 and m["cpu_seconds"] > 0 and m["cost_usd"] > 0
    assert m["onnx_parity_max_abs"] <= 1e-5
    files = {a.path for a in client.list_artifacts(result.run_id, "figures")}
    names = ("feature_importance.png", "confusion_matrix.png", "equity_curve.png")
    assert files == {f"figures/{f}" for f in names}
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(Path(f).name for f in files)
    golden = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=result.run_id, artifact_path="golden_rows.json",
        tracking_uri=stack_settings.mlflow_uri)).read_text())  # fmt: skip
    assert len(golden["inputs"]) == len(golden["p_up"]) == 32
    assert len(golden["inputs"][0]) == SPEC.n_features
    hist = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=result.run_id, artifact_path="reference_histograms.json",
        tracking_uri=stack_settings.mlflow_uri)).read_text())  # fmt: skip
    assert set(hist["features"]) == set(SPEC.names)
    assert all(sum(h["counts"]) == int(p["train_rows"]) for h in hist["features"].values())
    mv = client.get_model_version(name, result.version)
    assert mv.tags[SPEC_HASH_TAG] == SPEC.hash and mv.tags["model_type"] == model_type
    assert not client.get_registered_model(name).aliases  # the gate decides, not training
    with fluent_mlflow(client.tracking_uri):
        info = mlflow.models.get_model_info(f"models:/{name}/{result.version}")
    assert info.signature is not None and info.saved_input_example_info is not None


def test_the_gate_promotes_only_what_passes(
    stack_settings: Settings, dataset: Dataset, model_name: str
) -> None:
    uri = stack_settings.mlflow_uri
    client = _client(stack_settings)
    first = train_and_register(dataset, SPEC, uri, model_name, alias=None, params=PARAMS)
    # the issue's thresholds on this small real sample: refused, honestly, with the reason
    strict = validate_version(uri, model_name, GateParams(min_accuracy=0.54, min_sharpe=1.0))
    assert not strict.passed and strict.version == first.version
    mv = client.get_model_version(model_name, first.version)
    assert mv.tags["validation"] == "failed" and "test" in mv.tags["validation_reason"]
    assert not client.get_registered_model(model_name).aliases
    assert strict.candidate["accuracy"] == pytest.approx(first.metrics["test_accuracy"])
    # thresholds it does reach: promoted
    loose = GateParams(min_accuracy=0.0, min_sharpe=-1e9)
    assert validate_version(uri, model_name, loose).passed
    assert str(client.get_model_version_by_alias(model_name, "champion").version) == first.version
    # a second version must not be worse than the champion on its own test window
    hgb = replace(PARAMS, model_type="hgb")
    second = train_and_register(dataset, SPEC, uri, model_name, alias=None, params=hgb)
    demanding = replace(loose, accuracy_margin=-0.5)  # must beat the champion by 0.5
    refused = validate_version(uri, model_name, demanding, version=second.version)
    assert not refused.passed and refused.champion_version == first.version
    assert refused.champion is not None
    assert any("below champion" in r for r in refused.reasons)
    assert str(client.get_model_version_by_alias(model_name, "champion").version) == first.version
    accepted = validate_version(uri, model_name, replace(loose, accuracy_margin=1.0,
                                                         sharpe_margin=1e9))  # fmt: skip
    assert accepted.passed and accepted.version == second.version
    assert str(client.get_model_version_by_alias(model_name, "champion").version) == second.version


def test_the_monthly_budget_stops_training(
    stack_settings: Settings, dataset: Dataset, tmp_path: Path
) -> None:
    uri = stack_settings.mlflow_uri
    train_and_register(dataset, SPEC, uri, unique("budget"), alias=None, params=PARAMS)
    spent = month_cost(uri)
    assert spent > 0
    assert check_budget(uri, CostParams(monthly_budget_usd=spent + 1)) == spent
    with pytest.raises(BudgetExceeded, match="over the monthly budget"):
        check_budget(uri, CostParams(monthly_budget_usd=spent / 2))
    params_file = tmp_path / "params.yaml"
    params_file.write_text("train:\n  cost:\n    monthly_budget_usd: 0.0\n")
    env = {"MLFLOW_TRACKING_URI": uri, "TICKSERVE_STATE_DIR": str(tmp_path)}
    done = tickserve("train", "--params", str(params_file), env=env, cwd=tmp_path)
    assert done.returncode == 2
    assert "tickserve train: error: this month's training runs cost $" in done.stderr
    assert "not starting" in done.stderr


@pytest.mark.parametrize("progress", [True, False])
def test_training_names_each_step_on_stderr_only_when_asked(
    stack_settings: Settings, dataset: Dataset, progress: bool,
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.delenv("COLUMNS", raising=False)  # tqdm would trim its line to that width
    name = unique("progress")
    result = train_and_register(dataset, SPEC, stack_settings.mlflow_uri, name, alias=None,
                                params=PARAMS, progress=progress)  # fmt: skip
    err = capfd.readouterr().err
    steps = [
        "train: fold 1/3 fit + evaluate", "train: fold 2/3 fit + evaluate",
        "train: fold 3/3 (test) fit", "train: ONNX export + parity",
        "train: test metrics + figures", "train: MLflow log + register",
        f"train: registered {name} v{result.version}: 100%", "| 6/6 [",
    ]  # fmt: skip
    assert [step in err for step in steps] == [progress] * len(steps), err


def test_onnx_that_does_not_match_fails_the_run(dataset: Dataset) -> None:
    X = dataset.X[:2000].astype(np.float32)
    model = make_model("hgb", PARAMS.hgb).fit(X, dataset.y[:2000])
    onnx_model = export_onnx(model, X)
    native = model.predict_proba(X)[:, 1]
    _, gap = check_parity(onnx_model, native, X)
    assert gap <= 1e-5
    with pytest.raises(ModelRejected, match="ONNX differs"):
        check_parity(onnx_model, native + 2e-5, X)


def test_params_are_checked() -> None:
    with pytest.raises(ConfigError, match="embargo_bars"):
        parse_params({"train": {"splits": {"horizon_bars": 3, "embargo_bars": 2}}})
    with pytest.raises(ConfigError, match="unknown keys"):
        parse_params({"train": {"gate": {"min_acc": 0.5}}})
    with pytest.raises(ConfigError, match="model.type"):
        parse_params({"train": {"model": {"type": "xgb"}}})
    assert parse_params({}).model_type == "logistic"


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("model_type", ["hgb-gemm", "mlp"])
def test_gpu_model_types_pass_parity_the_gate_and_the_serving_checks(
    stack_settings: Settings, dataset: Dataset, model_type: str
) -> None:
    from inference.registry import fetch_golden, fetch_version, open_client, resolve_alias
    from inference.validation import GoldenRows, ValidationPolicy, validate

    uri = stack_settings.mlflow_uri
    name = unique(f"gpu-{model_type}")
    params = replace(PARAMS, model_type=model_type)
    result = train_and_register(dataset, SPEC, uri, name, alias=None, params=params)
    np.testing.assert_allclose(result.onnx_scores, result.native_scores, rtol=0, atol=1e-5)
    loose = GateParams(min_accuracy=0.0, min_sharpe=-1e9)
    decision = validate_version(uri, name, loose)
    assert decision.passed, decision.reasons
    assert decision.candidate["accuracy"] == pytest.approx(result.metrics["test_accuracy"])
    # what the worker does with the new champion: download, golden rows, serving checks
    ref = resolve_alias(open_client(uri), name, "champion")
    model = fetch_version(uri, ref, SPEC, prefer_gpu=False)
    golden = GoldenRows.parse(fetch_golden(uri, ref), SPEC.n_features)
    validate(model.scorer, golden, ValidationPolicy())
    expected = "tree-kernel" if model_type == "hgb-gemm" else "onnxruntime"
    assert model.scorer.engine == expected
