"""The validation gate: thresholds, then no worse than the champion on the same test window."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inference.registry import SPEC_HASH_TAG, fluent_mlflow
from inference.session import OnnxScorer
from tickserve.errors import ModelNotFound, RegistryError
from training.evaluate import evaluate
from training.params import GateParams
from training.train import TEST_WINDOW

logger = logging.getLogger(__name__)

GATE_TAG = "validation"
REASON_TAG = "validation_reason"


@dataclass(frozen=True, slots=True)
class GateDecision:
    """Whether a version became champion, and why (or why not)."""

    name: str
    version: str
    passed: bool
    reasons: tuple[str, ...]
    candidate: dict[str, float]
    champion_version: str | None = None
    champion: dict[str, float] | None = None

    def summary(self) -> str:
        """One line for the CLI."""
        head = f"{self.name} v{self.version}: "
        m = self.candidate
        figures = f"accuracy={m['accuracy']:.4f} sharpe={m['sharpe']:.2f}"
        if self.champion is not None:
            c = self.champion
            figures += (
                f"; champion v{self.champion_version} on the same window: "
                f"accuracy={c['accuracy']:.4f} sharpe={c['sharpe']:.2f}"
            )
        if self.passed:
            return head + f"promoted ({figures})"
        return head + "refused: " + "; ".join(self.reasons) + f" ({figures})"


def _score_on_window(client: Any, name: str, version: str, window: Any) -> np.ndarray:
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    uri = f"models:/{name}/{version}"
    try:
        with fluent_mlflow(client.tracking_uri):  # models:/ URIs resolve through the registry
            path = Path(download_artifacts(uri, tracking_uri=client.tracking_uri))
    except MlflowException as exc:
        message = f"downloading {uri} failed: {exc.message}"
        raise RegistryError(message, model=name, version=version) from exc
    onnx_file = next(path.rglob("*.onnx"))
    scorer = OnnxScorer.from_bytes(onnx_file.read_bytes(), window["X"].shape[1], False)
    return scorer.score(window["X"])


def _window_scorer(tracking_uri: str, run_id: str) -> tuple[dict[str, Any], Any]:
    """The test window a run saved, and a function giving the metrics of scores on it."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
        window_file = download_artifacts(
            run_id=run_id, artifact_path=TEST_WINDOW, tracking_uri=tracking_uri
        )
    except MlflowException as exc:
        message = f"reading {TEST_WINDOW} of run {run_id} failed: {exc.message}"
        raise RegistryError(message) from exc
    threshold = float(run.data.params.get("backtest_threshold", 0.0))
    fee_bps = float(run.data.params.get("fee_bps", 0.0))
    window = dict(np.load(window_file))

    def metrics_of(p_up: np.ndarray) -> dict[str, float]:
        m, _ = evaluate(
            window["y"],
            p_up,
            window["fwd_return"],
            window["event_ns"],
            window["label_end_ns"],
            window["symbols"],
            threshold,
            fee_bps,
        )
        return m

    return window, metrics_of


def evaluate_version(tracking_uri: str, name: str, version: str) -> dict[str, float]:
    """Metrics of the registered ONNX model itself, scored on its run's test window.

    Raises:
        ModelNotFound: No such model or version.
        RegistryError: MLflow failed to hand over the model or its test window.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        mv = client.get_model_version(name, version)
    except MlflowException as exc:
        raise ModelNotFound(f"no model {name} v{version} in {tracking_uri}: {exc}") from exc
    if mv.run_id is None:
        raise ModelNotFound(f"{name} v{version} has no training run in {tracking_uri}")
    window, metrics_of = _window_scorer(tracking_uri, mv.run_id)
    return metrics_of(_score_on_window(client, name, version, window))  # type: ignore[no-any-return]


def validate_version(
    tracking_uri: str,
    name: str,
    gate: GateParams,
    version: str | None = None,
    alias: str = "champion",
) -> GateDecision:
    """Judge a registered version; promote it to `alias` only if it passes.

    It must reach `gate.min_accuracy` and `gate.min_sharpe` on its test window, and,
    if there is a champion for the same FeatureSpec, be no worse than the champion
    scored on that same window (less the margins). A refused version stays
    registered with tags `validation=failed` and `validation_reason`.

    Raises:
        ModelNotFound: No such model or version.
        RegistryError: MLflow failed to hand over the model, or to record the decision.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        if version is None:
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise ModelNotFound(f"no versions of {name} in {tracking_uri}")
            version = str(max(int(v.version) for v in versions))
        mv = client.get_model_version(name, version)
    except MlflowException as exc:
        raise ModelNotFound(f"no model {name} v{version} in {tracking_uri}: {exc}") from exc
    if mv.run_id is None:
        raise ModelNotFound(f"{name} v{version} has no training run in {tracking_uri}")
    window, metrics_of = _window_scorer(tracking_uri, mv.run_id)
    candidate = metrics_of(_score_on_window(client, name, version, window))
    reasons = []
    if not candidate["accuracy"] >= gate.min_accuracy:
        reasons.append(f"test accuracy {candidate['accuracy']:.4f} < {gate.min_accuracy}")
    if not candidate["sharpe"] >= gate.min_sharpe:
        reasons.append(f"test Sharpe {candidate['sharpe']:.2f} < {gate.min_sharpe}")

    champion_version, champion = None, None
    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        current = None
    if current is not None and str(current.version) != version:
        if current.tags.get(SPEC_HASH_TAG) == mv.tags.get(SPEC_HASH_TAG):
            champion_version = str(current.version)
            champion = metrics_of(_score_on_window(client, name, champion_version, window))
            if candidate["accuracy"] < champion["accuracy"] - gate.accuracy_margin:
                reasons.append(
                    f"accuracy {candidate['accuracy']:.4f} below champion "
                    f"v{champion_version}'s {champion['accuracy']:.4f} on the same window"
                )
            if candidate["sharpe"] < champion["sharpe"] - gate.sharpe_margin:
                reasons.append(
                    f"Sharpe {candidate['sharpe']:.2f} below champion "
                    f"v{champion_version}'s {champion['sharpe']:.2f} on the same window"
                )
        else:
            logger.info("champion has another FeatureSpec: not comparable, thresholds only")

    passed = not reasons
    try:
        client.set_model_version_tag(name, version, GATE_TAG, "passed" if passed else "failed")
        client.set_model_version_tag(name, version, REASON_TAG, "; ".join(reasons) or "ok")
        if passed:
            client.set_registered_model_alias(name, alias, version)
    except MlflowException as exc:
        message = f"recording the gate's decision failed: {exc.message}"
        raise RegistryError(message, model=name, version=version) from exc
    decision = GateDecision(
        name, version, passed, tuple(reasons), candidate, champion_version, champion
    )
    logger.info("validation gate", extra={"model": name, "version": version, "passed": passed})
    return decision
