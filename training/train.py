"""Fit on purged walk-forward folds, export ONNX with a parity check, log and register in MLflow."""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from features.spec import FeatureSpec
from inference.registry import REFERENCE_ARTIFACT, SPEC_HASH_TAG, fluent_mlflow
from tickserve.errors import ConfigError, DataError, RegistryError
from tickserve.progress import progress_bar
from training import report
from training.cost import CostMeter
from training.dataset import Dataset
from training.evaluate import Backtest, evaluate
from training.models import PARITY_TOLERANCE, check_parity, export_onnx, make_model
from training.params import SplitParams, TrainParams
from training.splits import Fold, purged_folds

logger = logging.getLogger(__name__)

__all__ = ["PARITY_TOLERANCE", "TrainResult", "train_and_register", "universe_of"]

GOLDEN_ROWS = "golden_rows.json"  # read by the hot-swap validation: keep name and format
HISTOGRAMS = REFERENCE_ARTIFACT
TEST_WINDOW = "test_window.npz"


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What a training run produced."""

    name: str
    version: str
    run_id: str
    metrics: dict[str, float]
    X_test: np.ndarray
    native_scores: np.ndarray  # P(up) from scikit-learn on X_test
    onnx_scores: np.ndarray  # P(up) from ONNX Runtime on X_test
    model_type: str = "logistic"
    experiment: str = ""


def universe_of(symbols: np.ndarray) -> str:
    """Experiment-friendly name of a symbol set: `XRP/ETH` -> `XRP_ETH`, several joined by +."""
    return "+".join(sorted({str(s).replace("/", "_") for s in symbols})) or "empty"


def _default_params(ds: Dataset) -> TrainParams:
    """The logistic baseline, its folds fitted to the dataset's label horizon."""
    h = ds.horizon_bars
    return TrainParams(splits=SplitParams(horizon_bars=h, embargo_bars=h + 1))


def _fit_fold(params: TrainParams, X: np.ndarray, ds: Dataset, fold: Fold, k: int) -> Any:
    y = ds.y[fold.train]
    if len(np.unique(y)) < 2:
        raise DataError(f"fold {k}: the {len(y)} training labels are all one class")
    model = make_model(params.model_type, params.hyperparameters)
    return model.fit(X[fold.train], y)


def _evaluate_fold(
    params: TrainParams, ds: Dataset, rows: np.ndarray, p_up: np.ndarray
) -> tuple[dict[str, float], Backtest]:
    b = params.backtest
    return evaluate(
        ds.y[rows],
        p_up,
        ds.fwd_return[rows],
        ds.event_ns[rows],
        ds.label_end_ns[rows],
        ds.symbols[rows],
        b.threshold,
        b.fee_bps,
    )


def _artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifacts beside a sqlite store, not in ./mlruns of whatever the working directory is."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    return (db.parent / "mlartifacts" / experiment.replace("/", "_")).resolve().as_uri()


def _experiment_id(client: Any, tracking_uri: str, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    return str(client.create_experiment(name, _artifact_location(tracking_uri, name)))


def train_and_register(
    ds: Dataset,
    spec: FeatureSpec,
    tracking_uri: str,
    model_name: str,
    alias: str | None = "champion",
    *,
    params: TrainParams | None = None,
    provenance: dict[str, str] | None = None,
    meter: CostMeter | None = None,
    figures_dir: Path | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train on purged walk-forward folds, register the model as `model_name`.

    The earlier folds give `val_*` metrics, the last (latest) fold `test_*`; the model
    registered is the one fitted for the test fold. The run fails (ModelRejected) if
    ONNX scores differ from scikit-learn's by more than 1e-5 on the test rows.

    Args:
        ds: Training rows (see `build_dataset`).
        spec: The FeatureSpec the rows were computed with (tagged on the version).
        tracking_uri: MLflow tracking and registry URI.
        model_name: Registered model name.
        alias: Alias to point at the new version unconditionally (the demo);
            None leaves that to the validation gate (`training.gate`).
        params: Everything else (params.yaml); defaults to a logistic baseline on 4
            folds, its embargo covering the dataset's label horizon.
        provenance: Extra run params, e.g. git commit and DVC data hash.
        meter: Cost meter started where the run began (default: now).
        figures_dir: Also save the figures there as PNG.
        progress: Show a progress bar on stderr, one step per fold, then the ONNX
            export, the figures and the MLflow logging, each step named as it runs.

    Raises:
        RegistryError: MLflow failed to log the run or register the model.
    """
    from mlflow.exceptions import MlflowException

    meter = meter or CostMeter((params or TrainParams()).cost)
    params = params or _default_params(ds)
    steps = params.splits.n_folds + 3  # each fold, the ONNX export, the figures, MLflow
    with (
        progress_bar("train", total=steps, unit="step", enabled=progress) as bar,
        fluent_mlflow(tracking_uri),
    ):
        try:
            return _train_and_register(
                ds,
                spec,
                tracking_uri,
                model_name,
                alias,
                params,
                provenance,
                meter,
                figures_dir,
                bar,
            )
        except MlflowException as exc:
            message = f"logging or registering in {tracking_uri} failed: {exc.message}"
            raise RegistryError(message, model=model_name) from exc


def _train_and_register(
    ds: Dataset,
    spec: FeatureSpec,
    tracking_uri: str,
    model_name: str,
    alias: str | None,
    params: TrainParams,
    provenance: dict[str, str] | None,
    meter: CostMeter,
    figures_dir: Path | None,
    bar: Any,
) -> TrainResult:
    import mlflow
    import mlflow.onnx
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient
    from sklearn.inspection import permutation_importance

    s = params.splits
    if s.horizon_bars != ds.horizon_bars:
        raise ConfigError(
            f"params say a label horizon of {s.horizon_bars} bars, "
            f"the dataset has {ds.horizon_bars}"
        )
    folds = purged_folds(
        ds.event_ns,
        ds.label_end_ns,
        s.n_folds,
        purge_ns=s.purge_bars * spec.bar_ns,
        embargo_ns=s.embargo_bars * spec.bar_ns,
        walk_forward=True,
        min_label_ns=(s.horizon_bars + 1) * spec.bar_ns,
    )
    X = ds.X.astype(np.float32)  # what ONNX Runtime will be fed
    val: list[dict[str, float]] = []
    for k, fold in enumerate(folds[:-1], start=1):
        bar.set_description_str(f"train: fold {k}/{len(folds)} fit + evaluate")
        model = _fit_fold(params, X, ds, fold, k)
        p_up = model.predict_proba(X[fold.test])[:, 1]
        val.append(_evaluate_fold(params, ds, fold.test, p_up)[0])
        bar.update(1)
    last = folds[-1]
    bar.set_description_str(f"train: fold {len(folds)}/{len(folds)} (test) fit")
    model = _fit_fold(params, X, ds, last, len(folds))
    X_train, X_test, y_test = X[last.train], X[last.test], ds.y[last.test]
    native = model.predict_proba(X_test)[:, 1]
    bar.update(1)
    bar.set_description_str("train: ONNX export + parity")
    onnx_model = export_onnx(model, X_train, params.model_type)
    onnx_scores, gap = check_parity(onnx_model, native, X_test)
    bar.update(1)
    bar.set_description_str("train: test metrics + figures")
    test, bt = _evaluate_fold(params, ds, last.test, native)

    metrics = {f"test_{k}": v for k, v in test.items()}
    for key in val[0] if val else {}:
        metrics[f"val_{key}"] = float(np.nanmean([m[key] for m in val]))
    metrics["train_accuracy"] = float(
        np.mean((model.predict_proba(X_train)[:, 1] >= 0.5) == ds.y[last.train])
    )
    metrics["onnx_parity_max_abs"] = gap

    importance = permutation_importance(
        model, X_test, y_test, scoring="neg_log_loss", n_repeats=5, random_state=0
    ).importances_mean
    figures = {
        "feature_importance.png": report.feature_importance(
            spec.names, importance, f"{params.model_type}: permutation importance (test log loss)"
        ),
        "confusion_matrix.png": report.confusion(y_test, native),
        "equity_curve.png": report.equity_curve(
            bt, f"test backtest: Sharpe {bt.sharpe:.2f}, fees {params.backtest.fee_bps:g} bps"
        ),
    }
    bar.update(1)
    bar.set_description_str("train: MLflow log + register")
    experiment = f"tickserve/{universe_of(ds.symbols)}"
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment_id = _experiment_id(client, tracking_uri, experiment)
    test_rows = last.test
    run_params: dict[str, Any] = {
        "model_type": params.model_type,
        "n_features": spec.n_features,
        "features": ",".join(spec.names),
        "train_rows": len(last.train),
        "val_rows": int(sum(len(f.test) for f in folds[:-1])),
        "test_rows": len(test_rows),
        **{f"hp_{k}": v for k, v in params.hyperparameters.items()},
        SPEC_HASH_TAG: spec.hash,
        "bar_ns": spec.bar_ns,
        "horizon_bars": s.horizon_bars,
        "n_folds": s.n_folds,
        "purge_bars": s.purge_bars,
        "embargo_bars": s.embargo_bars,
        "backtest_threshold": params.backtest.threshold,
        "fee_bps": params.backtest.fee_bps,
        "symbols": ",".join(sorted({str(x) for x in ds.symbols})),
        "data_start_ns": int(ds.event_ns.min()),
        "data_end_ns": int(ds.event_ns.max()),
        "test_start_ns": int(ds.event_ns[test_rows].min()),
        "test_end_ns": int(ds.event_ns[test_rows].max()),
        **(provenance or {}),
    }
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{params.model_type}_new") as run:
        mlflow.log_params(run_params)
        mlflow.set_tag(SPEC_HASH_TAG, spec.hash)
        mlflow.log_metrics(metrics)
        for name, fig in figures.items():
            mlflow.log_figure(fig, f"figures/{name}")
            if figures_dir is not None:
                figures_dir.mkdir(parents=True, exist_ok=True)
                fig.savefig(figures_dir / name)
            report.close(fig)
        with tempfile.TemporaryDirectory() as tmp:
            k = min(32, len(X_test))
            golden = {"inputs": X_test[:k].tolist(), "p_up": onnx_scores[:k].tolist()}
            (Path(tmp) / GOLDEN_ROWS).write_text(json.dumps(golden))
            (Path(tmp) / HISTOGRAMS).write_text(
                json.dumps(report.reference_histograms(X_train, spec))
            )
            np.savez_compressed(
                Path(tmp) / TEST_WINDOW,
                X=X_test,
                y=y_test,
                fwd_return=ds.fwd_return[test_rows],
                event_ns=ds.event_ns[test_rows],
                label_end_ns=ds.label_end_ns[test_rows],
                symbols=ds.symbols[test_rows].astype(str),
            )
            for artifact in (GOLDEN_ROWS, HISTOGRAMS, TEST_WINDOW):
                mlflow.log_artifact(str(Path(tmp) / artifact))
        info = mlflow.onnx.log_model(
            onnx_model,
            name="model",
            registered_model_name=model_name,
            signature=infer_signature(X_train[:100], model.predict_proba(X_train[:100])[:, 1]),
            input_example=X_test[:5],
            onnx_execution_providers=["CPUExecutionProvider"],
            # one self-contained file: serving downloads only the .onnx (the tensors of
            # an hgb-gemm or mlp graph would otherwise go to a separate .data file)
            save_as_external_data=False,
            # inferring them re-imports the model in a subprocess (seconds per run)
            pip_requirements=["onnx", "onnxruntime"],
        )
        version = str(info.registered_model_version)
        cost = meter.read()
        metrics.update(cost.metrics())
        mlflow.log_metrics(cost.metrics())
    client.set_tag(run.info.run_id, "mlflow.runName", f"{params.model_type}_{version}")
    for key, value in {
        SPEC_HASH_TAG: spec.hash,
        "model_type": params.model_type,
        "experiment": experiment,
    }.items():
        client.set_model_version_tag(model_name, version, key, value)
    if alias:
        client.set_registered_model_alias(model_name, alias, version)
    bar.update(1)
    bar.set_description_str(f"train: registered {model_name} v{version}")
    logger.info(
        "model registered",
        extra={"model": model_name, "version": version, "alias": alias, **metrics},
    )
    return TrainResult(
        model_name,
        version,
        run.info.run_id,
        metrics,
        X_test,
        native,
        onnx_scores,
        params.model_type,
        experiment,
    )
