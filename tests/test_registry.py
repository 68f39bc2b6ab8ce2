"""Versions registered the common ways serve, whatever the process's default tracking URI."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from features.spec import FeatureSpec
from inference.registry import SPEC_HASH_TAG, fetch_version, fluent_mlflow, resolve_alias
from inference.testing import golden_for, make_onnx_classifier, register_version

SPEC = FeatureSpec()


def test_registering_leaves_no_tracking_uri_for_later_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    onnx = make_onnx_classifier(SPEC.n_features, "logistic", seed=3)
    with fluent_mlflow(uri):
        assert os.environ["MLFLOW_TRACKING_URI"] == uri == mlflow.get_tracking_uri()
    register_version(uri, "leak", onnx, SPEC.hash, None)
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert "MLFLOW_REGISTRY_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    with fluent_mlflow(uri):
        pass
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_a_version_registered_from_a_run_uri_serves(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    onnx = make_onnx_classifier(SPEC.n_features, "logistic", seed=2)
    first = register_version(uri, "reg", onnx, SPEC.hash, golden_for(onnx, SPEC.n_features))
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = client.get_model_version("reg", first).run_id
    # the way MLflow's docs register a run's model, in a process whose default store differs
    with fluent_mlflow(uri):
        version = mlflow.register_model(f"runs:/{run_id}/model", "reg").version
    client.set_model_version_tag("reg", version, SPEC_HASH_TAG, SPEC.hash)
    client.set_registered_model_alias("reg", "champion", version)
    with fluent_mlflow(f"sqlite:///{tmp_path}/elsewhere.db"):
        ref = resolve_alias(client, "reg", "champion")
        model = fetch_version(uri, ref, SPEC, prefer_gpu=False)
    assert (model.version, ref.run_id) == (str(version), run_id)
    assert model.scorer.score(np.zeros((1, SPEC.n_features))).shape == (1,)
