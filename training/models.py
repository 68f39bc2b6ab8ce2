"""The model zoo (logistic, HistGradientBoosting, an MLP) and ONNX export with a parity check.

Two of the types exist for a GPU: `mlp` (a network of standard operators) and
`hgb-gemm` (the same HistGradientBoosting as `hgb`, exported as tensor operators by
`training.compile_trees`). ONNX Runtime has CUDA kernels for every node of both, and
none for the `ai.onnx.ml` tree and linear operators the other two export to.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from inference.session import OnnxScorer
from tickserve.errors import ConfigError, ModelRejected
from training.compile_trees import compile_hgb
from training.compile_trees import to_onnx as gemm_onnx
from training.params import MODEL_TYPES
from training.standard_ops import ml_operators, to_standard_ops

PARITY_TOLERANCE = 1e-5


def make_model(model_type: str, hyperparameters: dict[str, Any]) -> Any:
    """An unfitted scikit-learn classifier of `model_type` (one of `MODEL_TYPES`)."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    try:
        if model_type == "logistic":
            return make_pipeline(StandardScaler(), LogisticRegression(**hyperparameters))
        if model_type in ("hgb", "hgb-gemm"):
            return HistGradientBoostingClassifier(**hyperparameters)
        if model_type == "mlp":
            hp = dict(hyperparameters)
            hp["hidden_layer_sizes"] = tuple(hp.get("hidden_layer_sizes", (100,)))
            return make_pipeline(StandardScaler(), MLPClassifier(**hp))
    except TypeError as exc:
        raise ConfigError(f"bad hyperparameters for {model_type}: {exc}") from exc
    raise ConfigError(f"unknown model type {model_type!r} (one of {MODEL_TYPES})")


def export_onnx(model: Any, X_sample: np.ndarray, model_type: str = "") -> Any:
    """The fitted model as an ONNX graph with a plain probability tensor (no ZipMap).

    `hgb-gemm` is compiled to tensor operators (`training.compile_trees`) and `mlp`
    has skl2onnx's `ai.onnx.ml` helpers rewritten (`training.standard_ops`): both
    graphs hold standard operators only. Others are skl2onnx's export as it is.
    """
    if model_type == "hgb-gemm":
        return gemm_onnx(compile_hgb(model))
    exported = _skl2onnx(model, X_sample)
    if model_type == "mlp":
        exported = to_standard_ops(exported)
        left = ml_operators(exported)
        if left:
            raise ModelRejected(f"the MLP export kept ai.onnx.ml operators {left}")
    return exported


def _skl2onnx(model: Any, X_sample: np.ndarray) -> Any:
    from skl2onnx import to_onnx

    estimator = model.steps[-1][1] if hasattr(model, "steps") else model
    with warnings.catch_warnings():
        # skl2onnx 1.20 puts numpy bools into the int list `nodes_missing_value_tracks_true`
        # of tree ensembles; protobuf 6 warns (7 rejects it, hence protobuf<7). Under
        # -W error the warning surfaces from upb as "ValueError: Value out of range".
        warnings.filterwarnings(
            "ignore", "Field onnx.AttributeProto.ints", category=DeprecationWarning
        )
        return to_onnx(
            model,
            X_sample[:1].astype(np.float32),
            options={id(estimator): {"zipmap": False}},
            target_opset={"": 17, "ai.onnx.ml": 3},
        )


def check_parity(onnx_model: Any, native: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, float]:
    """ONNX Runtime's P(up) on `X` and its largest gap to `native`; over 1e-5 fails the run.

    Raises:
        ModelRejected: The exported model does not score what was evaluated.
    """
    # ONNX Runtime, not the tree kernel: these scores become the golden rows that any
    # serving engine must reproduce
    scorer = OnnxScorer.from_bytes(
        onnx_model.SerializeToString(), X.shape[1], False, numba_kernels=False
    )
    scores = scorer.score(X.astype(np.float32))
    gap = float(np.max(np.abs(scores - native))) if len(native) else 0.0
    if not gap <= PARITY_TOLERANCE:
        raise ModelRejected(f"ONNX differs from scikit-learn by {gap:.2e} > {PARITY_TOLERANCE}")
    return scores, gap
