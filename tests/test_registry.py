"""Versions registered the common ways serve, whatever the process's default tracking URI."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from features.spec import FeatureSpec
from inference.registry import SPEC_HASH_TAG, fetch_version, resolve_alias
from inference.testing import golden_for, make_onnx_classifier, register_version

SPEC = FeatureSpec()


def test_a_version_registered_from_a_run_uri_serves(tmp_path: Path) -> None:
    # mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI, which later tests (and their
    # subprocesses) read: put back what was there
    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        _register_from_a_run_and_serve(tmp_path)
    finally:
        mlflow.set_tracking_uri(before)


def _register_from_a_run_and_serve(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    onnx = make_onnx_classifier(SPEC.n_features, "logistic", seed=2)
    first = register_version(uri, "reg", onnx, SPEC.hash, golden_for(onnx, SPEC.n_features))
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = client.get_model_version("reg", first).run_id
    # the way MLflow's docs register a run's model, in a process whose default store differs
    version = mlflow.register_model(f"runs:/{run_id}/model", "reg").version
    client.set_model_version_tag("reg", version, SPEC_HASH_TAG, SPEC.hash)
    client.set_registered_model_alias("reg", "champion", version)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/elsewhere.db")
    ref = resolve_alias(client, "reg", "champion")
    model = fetch_version(uri, ref, SPEC, prefer_gpu=False)
    assert (model.version, ref.run_id) == (str(version), run_id)
    assert model.scorer.score(np.zeros((1, SPEC.n_features))).shape == (1,)
