"""The model source: MLflow registry aliases -> a checked, loaded ONNX scorer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from features.spec import FeatureSpec
from inference.session import OnnxScorer
from tickserve.errors import ModelNotFound, ModelRejected

logger = logging.getLogger(__name__)

SPEC_HASH_TAG = "feature_spec_hash"


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A model version that passed its checks and may serve."""

    name: str
    version: str
    alias: str
    spec_hash: str
    scorer: OnnxScorer
    loaded_at_ns: int


def load_model(
    tracking_uri: str, name: str, alias: str, spec: FeatureSpec, prefer_gpu: bool = True
) -> LoadedModel:
    """Resolve `models:/<name>@<alias>`, download its ONNX file and check it against `spec`.

    Raises:
        ModelNotFound: No such registered model or alias.
        ModelRejected: The version was trained for another FeatureSpec or does not load.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        raise ModelNotFound(
            f"no model at models:/{name}@{alias} in {tracking_uri} "
            "(train and promote one: tickserve train, tickserve validate)"
        ) from exc
    spec_hash = mv.tags.get(SPEC_HASH_TAG, "")
    if spec_hash != spec.hash:
        raise ModelRejected(
            f"{name} v{mv.version} was trained with FeatureSpec {spec_hash or '(none)'}, "
            f"this worker computes {spec.hash}: refusing to score with it"
        )
    mlflow.set_tracking_uri(tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{mv.version}"))
    onnx_files = sorted(local.glob("*.onnx"))
    if not onnx_files:
        raise ModelRejected(f"{name} v{mv.version} has no .onnx file (only ONNX is served)")
    scorer = OnnxScorer.from_bytes(onnx_files[0].read_bytes(), spec.n_features, prefer_gpu)
    logger.info(
        "model loaded",
        extra={"model": name, "version": mv.version, "alias": alias, "provider": scorer.provider},
    )
    return LoadedModel(name, str(mv.version), alias, spec_hash, scorer, time.time_ns())
