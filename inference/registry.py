"""The model source: MLflow registry aliases -> a checked, loaded ONNX scorer."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inference.engines import GpuPolicy
from inference.session import OnnxScorer
from inference.trees import TreeKernel
from tickserve.errors import ModelNotFound, ModelRejected, RegistryError

if TYPE_CHECKING:  # only read, never built here: the batcher imports this module
    from features.spec import FeatureSpec

logger = logging.getLogger(__name__)

SPEC_HASH_TAG = "feature_spec_hash"
GOLDEN_ARTIFACT = "golden_rows.json"
# per-feature histograms of the training rows (training.report), for drift (stream.monitor)
REFERENCE_ARTIFACT = "reference_histograms.json"
# What MLflow answers for a missing model (RESOURCE_DOES_NOT_EXIST) or alias
# (INVALID_PARAMETER_VALUE); any other code is the registry failing, not an answer.
_NOT_FOUND = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"})


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A model version that passed its checks and may serve."""

    name: str
    version: str
    alias: str
    spec_hash: str
    scorer: OnnxScorer
    loaded_at_ns: int


@dataclass(frozen=True, slots=True)
class VersionRef:
    """Where an alias points: one registered version and what is needed to fetch it."""

    name: str
    version: str
    alias: str
    spec_hash: str
    run_id: str


@contextmanager
def fluent_mlflow(tracking_uri: str) -> Iterator[None]:
    """MLflow's fluent API (`mlflow.start_run`, `models:/` URIs) on `tracking_uri`, for a block.

    `mlflow.set_tracking_uri` also writes MLFLOW_TRACKING_URI (and the registry's
    MLFLOW_REGISTRY_URI) into os.environ, where every process started later would
    find it; afterwards both are as they were, so a training or a gate run in-process
    (the demo, tests) leaves no registry behind for the next process.
    """
    import mlflow

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = {name: os.environ.get(name) for name in names}
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])  # type: ignore[arg-type]
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])  # type: ignore[arg-type]
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def open_client(tracking_uri: str) -> Any:
    """An MlflowClient for `tracking_uri` (tracking and registry on the same store).

    Raises:
        RegistryError: MLflow has no store for the URI.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    except MlflowException as exc:
        raise RegistryError(f"cannot open {tracking_uri}: {exc.message}") from exc


def resolve_alias(client: Any, name: str, alias: str) -> VersionRef:
    """The version behind `models:/<name>@<alias>`: one registry call (it runs every poll).

    Raises:
        ModelNotFound: No such registered model or alias.
        RegistryError: The registry failed to answer.
    """
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code not in _NOT_FOUND:
            message = f"looking up alias {alias} failed: {exc.message}"
            raise RegistryError(message, model=name) from exc
        raise ModelNotFound(
            f"no model at models:/{name}@{alias} in {client.tracking_uri} "
            "(train and promote one: tickserve train, tickserve validate)"
        ) from exc
    spec_hash = mv.tags.get(SPEC_HASH_TAG, "")
    return VersionRef(name, str(mv.version), alias, spec_hash, mv.run_id or "")


def fetch_version(
    tracking_uri: str,
    ref: VersionRef,
    spec: FeatureSpec,
    prefer_gpu: bool = True,
    threads: int = 1,
    numba_kernels: bool | Callable[[bytes, int], TreeKernel] = True,
    tensorrt: bool = False,
    gpu: GpuPolicy | None = None,
    max_bytes: int | None = None,
) -> LoadedModel:
    """Check the FeatureSpec tag, download only the ONNX file and open a session on it.

    Only `.onnx` bytes are read: nothing from the registry is ever unpickled here. A
    file over `max_bytes` is refused by the size the artifact listing gives, before it
    is downloaded; where the listing gives none, by the downloaded file's size, before
    it is read.

    Raises:
        ModelRejected: Another FeatureSpec, no ONNX file, a file over `max_bytes`, or a
            file that does not load.
    """
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    if ref.spec_hash != spec.hash:
        raise ModelRejected(
            f"{ref.name} v{ref.version} was trained with FeatureSpec {ref.spec_hash or '(none)'}, "
            f"this worker computes {spec.hash}: refusing to score with it",
            reason="spec_hash",
            version=ref.version,
        )
    try:
        # looked up here, not in every poll: it cost ~3x the alias lookup (sqlite store)
        uri = open_client(tracking_uri).get_model_version_download_uri(ref.name, ref.version)
        listed = mlflow.artifacts.list_artifacts(artifact_uri=uri, tracking_uri=tracking_uri)
        onnx_files = sorted((a for a in listed if a.path.endswith(".onnx")), key=_path)
        if not onnx_files:
            raise ModelRejected(
                f"{ref.name} v{ref.version} has no .onnx file (only ONNX is served)",
                reason="not_onnx",
                version=ref.version,
            )
        name, listed_size = Path(onnx_files[0].path).name, onnx_files[0].file_size
        if listed_size is not None:
            _check_size(ref, name, listed_size, max_bytes)
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{uri.rstrip('/')}/{name}", tracking_uri=tracking_uri
        )
    except MlflowException as exc:
        raise ModelRejected(
            f"{ref.name} v{ref.version}: downloading the ONNX file failed: {exc}",
            reason="download",
            version=ref.version,
        ) from exc
    if listed_size is None:  # a store whose listing gives no sizes
        _check_size(ref, name, Path(local).stat().st_size, max_bytes)
    try:
        scorer = OnnxScorer.from_bytes(
            Path(local).read_bytes(),
            spec.n_features,
            prefer_gpu,
            threads,
            numba_kernels,
            tensorrt,
            gpu,
        )
    except ModelRejected as exc:
        raise ModelRejected(
            f"{ref.name} v{ref.version}: {exc}", reason=exc.reason, version=ref.version
        ) from exc
    return LoadedModel(ref.name, ref.version, ref.alias, ref.spec_hash, scorer, time.time_ns())


def _path(info: Any) -> str:
    """Sort key of an MLflow FileInfo."""
    return str(info.path)


def _check_size(ref: VersionRef, name: str, size: int, max_bytes: int | None) -> None:
    """Refuse a model file larger than `max_bytes` (None: no limit).

    Raises:
        ModelRejected: With reason `size`; the message gives the size and the limit.
    """
    if max_bytes is None or size <= max_bytes:
        return
    mib = 2**20
    raise ModelRejected(
        f"{ref.name} v{ref.version}: {name} is {size / mib:.1f} MiB ({size} bytes), over "
        f"the {max_bytes / mib:g} MiB limit (TICKSERVE_MAX_MODEL_MB): not loaded",
        reason="size",
        version=ref.version,
    )


def fetch_golden(tracking_uri: str, ref: VersionRef) -> bytes:
    """The golden rows logged with the version's training run (`golden_rows.json`).

    Raises:
        ModelRejected: The run has no golden rows (a version that cannot be checked
            must not serve).
    """
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=ref.run_id, artifact_path=GOLDEN_ARTIFACT, tracking_uri=tracking_uri
        )
    except (MlflowException, OSError) as exc:
        raise ModelRejected(
            f"{ref.name} v{ref.version} has no {GOLDEN_ARTIFACT} on run {ref.run_id}: {exc}",
            reason="golden_missing",
            version=ref.version,
        ) from exc
    return Path(local).read_bytes()


def load_model(
    tracking_uri: str, name: str, alias: str, spec: FeatureSpec, prefer_gpu: bool = True
) -> LoadedModel:
    """Resolve `models:/<name>@<alias>`, download its ONNX file and check it against `spec`.

    Raises:
        ModelNotFound: No such registered model or alias.
        ModelRejected: The version was trained for another FeatureSpec or does not load.
        RegistryError: The registry failed to answer.
    """
    ref = resolve_alias(open_client(tracking_uri), name, alias)
    model = fetch_version(tracking_uri, ref, spec, prefer_gpu)
    logger.info(
        "model loaded",
        extra={
            "model": name,
            "version": ref.version,
            "alias": alias,
            "provider": model.scorer.provider,
        },
    )
    return model
