"""The serving version's reference: its training histograms and label horizon, from MLflow."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inference.registry import REFERENCE_ARTIFACT, VersionRef, open_client, resolve_alias
from tickserve.errors import ModelError, RegistryError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Reference:
    """What the monitor compares live data with, for one model version.

    Attributes:
        model: Registered model name.
        version: The version the histograms belong to.
        horizon_bars: The label horizon the version was trained on.
        edges: Per feature name, its bin edges.
        counts: Per feature name, the training rows per bin.
    """

    model: str
    version: str
    horizon_bars: int
    edges: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]

    @classmethod
    def from_histograms(
        cls, model: str, version: str, doc: dict[str, Any], horizon_bars: int = 1
    ) -> Reference:
        """Build from the JSON of `training.report.reference_histograms`."""
        features = doc["features"]
        return cls(
            model,
            version,
            horizon_bars,
            {name: np.asarray(f["edges"], np.float64) for name, f in features.items()},
            {name: np.asarray(f["counts"], np.int64) for name, f in features.items()},
        )


def fetch_reference(tracking_uri: str, ref: VersionRef) -> Reference:
    """Download the version's reference histograms and read its label horizon.

    Raises:
        RegistryError: The run has no histograms, or MLflow failed to answer.
    """
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=ref.run_id, artifact_path=REFERENCE_ARTIFACT, tracking_uri=tracking_uri
        )
        params = open_client(tracking_uri).get_run(ref.run_id).data.params
    except (MlflowException, OSError) as exc:
        message = f"no {REFERENCE_ARTIFACT} for v{ref.version} (run {ref.run_id}): {exc}"
        raise RegistryError(message, model=ref.name) from exc
    doc = json.loads(Path(local).read_text())
    horizon = int(params.get("horizon_bars", 1))
    return Reference.from_histograms(ref.name, ref.version, doc, horizon)


class ReferenceFollower:
    """Follows `models:/<name>@<alias>`; fetches the reference again when the alias moves."""

    def __init__(self, tracking_uri: str, name: str, alias: str) -> None:
        """Follow `name@alias` in the registry at `tracking_uri`."""
        self.tracking_uri = tracking_uri
        self.name = name
        self.alias = alias
        self.current: Reference | None = None
        self._last_error = ""

    def poll(self) -> Reference | None:
        """Look the alias up once (blocking); returns the reference if it changed.

        A missing model or alias, or a registry failure, is logged (once while it
        lasts) and leaves the current reference in place (the monitor keeps counting
        accuracy meanwhile).
        """
        try:
            ref = resolve_alias(open_client(self.tracking_uri), self.name, self.alias)
            if self.current is not None and self.current.version == ref.version:
                return None
            reference = fetch_reference(self.tracking_uri, ref)
        except (ModelError, RegistryError) as exc:
            if str(exc) != self._last_error:
                self._last_error = str(exc)
                logger.warning(
                    "no reference histograms", extra={"model": self.name, "error": str(exc)}
                )
            return None
        self._last_error = ""
        self.current = reference
        logger.info(
            "reference loaded",
            extra={
                "model": self.name,
                "version": ref.version,
                "horizon_bars": reference.horizon_bars,
            },
        )
        return reference
