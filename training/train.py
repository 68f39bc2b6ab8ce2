"""Fit a classifier, export ONNX, prove parity, log and register it in MLflow."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.spec import FeatureSpec
from inference.registry import SPEC_HASH_TAG
from inference.session import OnnxScorer
from tickserve.errors import ModelRejected
from training.dataset import Dataset

logger = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-5


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


def _time_split(ds: Dataset, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Train on the earliest rows, test on the latest (no shuffling across time)."""
    order = np.argsort(ds.event_ns, kind="stable")
    cut = int(len(order) * (1 - test_fraction))
    return order[:cut], order[cut:]


def train_and_register(
    ds: Dataset,
    spec: FeatureSpec,
    tracking_uri: str,
    model_name: str,
    alias: str = "champion",
    test_fraction: float = 0.2,
    C: float = 1.0,
) -> TrainResult:
    """Train a logistic baseline on `ds`, register it as `model_name`, point `alias` at it.

    The run fails (ModelRejected) if ONNX scores differ from scikit-learn's by more
    than 1e-5 on the test rows: a model that does not serve what was evaluated must
    never be registered.
    """
    import mlflow
    import mlflow.onnx
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, log_loss, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    started = time.perf_counter()
    train_idx, test_idx = _time_split(ds, test_fraction)
    X = ds.X.astype(np.float32)  # what ONNX Runtime will be fed
    X_train, y_train, X_test, y_test = X[train_idx], ds.y[train_idx], X[test_idx], ds.y[test_idx]
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000))
    pipeline.fit(X_train, y_train)
    native = pipeline.predict_proba(X_test)[:, 1]

    onnx_model = to_onnx(
        pipeline, X_train[:1], options={id(pipeline.steps[-1][1]): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )  # fmt: skip
    scorer = OnnxScorer.from_bytes(onnx_model.SerializeToString(), spec.n_features, False)
    onnx_scores = scorer.score(X_test)
    gap = float(np.max(np.abs(onnx_scores - native))) if len(native) else 0.0
    if gap > PARITY_TOLERANCE:
        raise ModelRejected(f"ONNX differs from scikit-learn by {gap:.2e} > {PARITY_TOLERANCE}")

    metrics = {
        "test_accuracy": float(accuracy_score(y_test, native >= 0.5)),
        "test_log_loss": float(log_loss(y_test, native, labels=[0, 1])),
        "test_auc": float(roc_auc_score(y_test, native)) if len(set(y_test)) > 1 else float("nan"),
        "train_accuracy": float(accuracy_score(y_train, pipeline.predict(X_train))),
        "onnx_parity_max_abs": gap,
        "train_seconds": time.perf_counter() - started,
    }
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    mlflow.set_experiment(model_name)
    with mlflow.start_run(run_name=f"logistic_{spec.hash[:8]}") as run:
        mlflow.log_params(
            {
                "model_type": "logistic",
                "C": C,
                "n_features": spec.n_features,
                "features": ",".join(spec.names),
                "train_rows": len(train_idx),
                "test_rows": len(test_idx),
                SPEC_HASH_TAG: spec.hash,
                "bar_ns": spec.bar_ns,
                "data_start_ns": int(ds.event_ns.min()),
                "data_end_ns": int(ds.event_ns.max()),
            }
        )
        mlflow.log_metrics(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            golden = Path(tmp) / "golden_rows.json"
            k = min(32, len(X_test))
            golden.write_text(
                json.dumps({"inputs": X_test[:k].tolist(), "p_up": onnx_scores[:k].tolist()})
            )
            mlflow.log_artifact(str(golden))
        info = mlflow.onnx.log_model(
            onnx_model,
            name="model",
            registered_model_name=model_name,
            signature=infer_signature(X_test[:5], onnx_scores[:5]),
            input_example=X_test[:5],
            onnx_execution_providers=["CPUExecutionProvider"],
        )
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    version = str(info.registered_model_version)
    client.set_model_version_tag(model_name, version, SPEC_HASH_TAG, spec.hash)
    client.set_registered_model_alias(model_name, alias, version)
    logger.info(
        "model registered",
        extra={"model": model_name, "version": version, "alias": alias, **metrics},
    )
    return TrainResult(model_name, version, run.info.run_id, metrics, X_test, native, onnx_scores)
