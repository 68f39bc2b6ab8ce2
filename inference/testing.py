"""Small real models and a registration helper for tests and benchmarks (not the serving path)."""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from inference.registry import SPEC_HASH_TAG, LoadedModel, fluent_mlflow
from inference.session import OnnxScorer


def synthetic_rows(n: int, n_features: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Feature rows (float32) and labels with some signal in them."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_features)).astype(np.float32)
    logits = X @ rng.normal(size=n_features) + rng.normal(scale=0.5, size=n)
    return X, (logits > 0).astype(np.int64)


def make_onnx_classifier(
    n_features: int, kind: str = "logistic", seed: int = 7, n_rows: int = 2000, **params: object
) -> bytes:
    """Fit a scikit-learn classifier on synthetic rows and export it like `training/` does.

    Args:
        n_features: Input width.
        kind: "logistic" (scaler + logistic regression) or "hgb" (HistGradientBoosting).
        seed: Data seed; different seeds give different models.
        n_rows: Training rows.
        **params: Passed to the classifier (e.g. C=0.1, max_iter=200).
    """
    from skl2onnx import to_onnx
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = synthetic_rows(n_rows, n_features, seed)
    if kind == "logistic":
        clf: Any = LogisticRegression(max_iter=1000, **params)
        model: Any = make_pipeline(StandardScaler(), clf)
    elif kind == "hgb":
        clf = HistGradientBoostingClassifier(random_state=seed, **params)
        model = clf
    else:
        raise ValueError(f"unknown kind {kind!r}")
    model.fit(X, y)
    with warnings.catch_warnings():
        # skl2onnx 1.20 puts Python bools into TreeEnsemble int attributes; protobuf 6
        # warns (7 refuses, hence protobuf<7): not ours to fix, and harmless under 6.
        warnings.filterwarnings("ignore", "Field onnx.AttributeProto.ints", DeprecationWarning)
        onx = to_onnx(
            model,
            X[:1],
            options={id(clf): {"zipmap": False}},
            target_opset={"": 17, "ai.onnx.ml": 3},
        )
    return bytes(onx.SerializeToString())


def poison_with_nan(onnx_bytes: bytes) -> bytes:
    """The same model whose probabilities come out NaN (every float initializer set to NaN)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(onnx_bytes)
    for i, init in enumerate(model.graph.initializer):
        values = numpy_helper.to_array(init)
        if values.dtype.kind == "f":
            bad = numpy_helper.from_array(np.full_like(values, np.nan), init.name)
            model.graph.initializer[i].CopyFrom(bad)
    for node in model.graph.node:  # TreeEnsemble/LinearClassifier keep weights in attributes
        for attr in node.attribute:
            if attr.floats:
                attr.floats[:] = [float("nan")] * len(attr.floats)
    return bytes(model.SerializeToString())


def with_ballast(onnx_bytes: bytes, n_bytes: int) -> bytes:
    """The same classifier carrying an `n_bytes` initializer that it reads on every call.

    Its probabilities gain `0 * ballast[int(0 * min(x))]`, which changes nothing but
    depends on the input, so no graph optimization can fold the initializer away.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_from_string(onnx_bytes)
    graph = model.graph
    inp = graph.input[0].name
    prob = next(o.name for o in graph.output if "prob" in o.name)
    for node in graph.node:
        for i, out in enumerate(node.output):
            if out == prob:
                node.output[i] = "probabilities_before"
    values = np.arange(n_bytes // 4, dtype=np.float32) % 7
    graph.initializer.extend(
        [
            numpy_helper.from_array(values, "ballast"),
            numpy_helper.from_array(np.array(0.0, np.float32), "ballast_zero"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("ReduceMin", [inp], ["ballast_min"], keepdims=0),
            helper.make_node("Mul", ["ballast_min", "ballast_zero"], ["ballast_at"]),
            helper.make_node("Cast", ["ballast_at"], ["ballast_index"], to=TensorProto.INT64),
            helper.make_node("Gather", ["ballast", "ballast_index"], ["ballast_value"]),
            helper.make_node("Mul", ["ballast_value", "ballast_zero"], ["ballast_nothing"]),
            helper.make_node("Add", ["probabilities_before", "ballast_nothing"], [prob]),
        ]
    )
    return bytes(model.SerializeToString())


def loaded(
    onnx_bytes: bytes,
    n_features: int,
    version: str = "1",
    name: str = "m",
    threads: int = 1,
    numba_kernels: bool = True,
) -> LoadedModel:
    """A LoadedModel straight from bytes, for tests that need no registry."""
    scorer = OnnxScorer.from_bytes(onnx_bytes, n_features, False, threads, numba_kernels)
    return LoadedModel(name, version, "champion", "", scorer, time.time_ns())


def golden_for(
    onnx_bytes: bytes, n_features: int, rows: int = 32, seed: int = 11
) -> dict[str, Any]:
    """golden_rows.json content for a model: its own scores on synthetic rows."""
    X, _ = synthetic_rows(rows, n_features, seed)
    p_up = loaded(onnx_bytes, n_features, numba_kernels=False).scorer.score(X)  # the reference
    return {"inputs": X.tolist(), "p_up": p_up.tolist()}


def register_version(
    tracking_uri: str,
    name: str,
    onnx_bytes: bytes,
    spec_hash: str,
    golden: dict[str, Any] | None,
    alias: str | None = None,
) -> str:
    """Log an ONNX model and its golden rows as `training/` does; returns the new version."""
    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    elif tracking_uri.startswith("sqlite:///"):
        # keep artifacts beside the database, not in ./mlruns of whatever the cwd is
        where = Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts" / name
        experiment_id = client.create_experiment(name, artifact_location=where.as_uri())
    else:
        experiment_id = client.create_experiment(name)
    with fluent_mlflow(tracking_uri), mlflow.start_run(experiment_id=experiment_id):
        if golden is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "golden_rows.json"
                path.write_text(json.dumps(golden))
                mlflow.log_artifact(str(path))
        info = mlflow.onnx.log_model(
            onnx.load_from_string(onnx_bytes),
            name="model",
            registered_model_name=name,
            onnx_execution_providers=["CPUExecutionProvider"],
            save_as_external_data=False,  # one file, as training/ logs it
        )
    version = str(info.registered_model_version)
    client.set_model_version_tag(name, version, SPEC_HASH_TAG, spec_hash)
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return version


class FakeClock:
    """A nanosecond clock that only moves when a fake engine spends time."""

    def __init__(self) -> None:
        """Start at zero."""
        self.now_ns = 0

    def __call__(self) -> int:
        """The current time in ns (like `time.perf_counter_ns`)."""
        return self.now_ns


class FakeEngine:
    """An engine whose call costs `fixed_us + per_row_us * n` on a `FakeClock`.

    It scores with `reference` (plus `bias`), counts the batches and rows it was given,
    and raises `fails` at construction when set (through `make`).
    """

    def __init__(
        self,
        name: str,
        clock: FakeClock,
        fixed_us: float,
        per_row_us: float,
        reference: Any,
        bias: float = 0.0,
    ) -> None:
        """An engine named `name` with that cost model."""
        self.name = name
        self.clock = clock
        self.fixed_us = fixed_us
        self.per_row_us = per_row_us
        self.reference = reference
        self.bias = bias
        self.batches: list[int] = []

    def score(self, rows: np.ndarray) -> np.ndarray:
        """The reference's scores, after spending this engine's cost on the clock."""
        self.clock.now_ns += int(1000 * (self.fixed_us + self.per_row_us * rows.shape[0]))
        self.batches.append(rows.shape[0])
        return np.asarray(self.reference(rows), np.float64) + self.bias
