"""The GPU model types: the GEMM tree compiler and the MLP export, held against scikit-learn."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import orjson
import pandas as pd
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier

from features.spec import FeatureSpec
from inference.gemm_kernel import compile_gemm_graph
from inference.testing import golden_for, loaded, make_onnx_classifier, synthetic_rows
from inference.trees import MAX_LEAVES, Unsupported
from inference.validation import GoldenRows, ValidationPolicy, validate
from tests.helpers import TRADES
from tickserve.errors import ModelRejected
from training.compile_trees import compile_hgb, to_onnx
from training.dataset import build_dataset
from training.models import check_parity, export_onnx, make_model
from training.params import TrainParams
from training.standard_ops import ml_operators

N = 6


def _rows(n: int, seed: int, nan_share: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, N)).astype(np.float32)
    X[rng.random(X.shape) < nan_share] = np.nan
    return X


def _labels(X: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    signal = np.nan_to_num(X[:, 0]) - 0.7 * np.nan_to_num(X[:, 1]) * np.nan_to_num(X[:, 2])
    return (signal + rng.normal(scale=0.5, size=len(X)) > 0).astype(np.int64)


def _scores(model: Any, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    label, probabilities = session.run(["label", "probabilities"], {"X": X})
    return label, probabilities


def _assert_same_as_sklearn(clf: HistGradientBoostingClassifier, X: np.ndarray) -> None:
    trees = compile_hgb(clf)
    model = to_onnx(trees)
    label, probabilities = _scores(model, X)
    native = clf.predict_proba(X)[:, 1]
    np.testing.assert_allclose(probabilities[:, 1], native, rtol=0, atol=1e-6)
    # on a CPU the same graph is served by the tree kernel, read back from its tensors
    if trees.paths.shape[2] > MAX_LEAVES:
        with pytest.raises(Unsupported, match="leaves"):
            compile_gemm_graph(model, X.shape[1])
    else:
        kernel = compile_gemm_graph(model, X.shape[1])
        np.testing.assert_allclose(kernel.score(X), native, rtol=0, atol=1e-6)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(label, clf.predict(X))
    np.testing.assert_allclose(trees.raw_score(X), clf.decision_function(X), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "params",
    [
        {"max_iter": 60, "max_leaf_nodes": 15},
        {"max_iter": 30, "max_depth": 1},  # stumps
        {"max_iter": 30, "max_depth": 3, "max_leaf_nodes": None},
        {"max_iter": 10, "max_leaf_nodes": 80, "min_samples_leaf": 5},  # more than 64 leaves
    ],
)
def test_compiled_trees_score_as_scikit_learn(params: dict[str, Any]) -> None:
    X = _rows(6000, seed=1)
    clf = HistGradientBoostingClassifier(random_state=0, early_stopping=False, **params)
    clf.fit(X, _labels(X, 2))
    _assert_same_as_sklearn(clf, _rows(3000, seed=3))


def test_nan_follows_each_split_s_missing_direction() -> None:
    X = _rows(6000, seed=4, nan_share=0.15)
    clf = HistGradientBoostingClassifier(max_iter=50, random_state=0, early_stopping=False)
    clf.fit(X, _labels(X, 5))
    trees = compile_hgb(clf)
    assert trees.nan_left.any() and not trees.nan_left.all()  # both directions exercised
    test = _rows(3000, seed=6, nan_share=0.3)
    test[:10] = np.nan  # rows with nothing but NaN
    _assert_same_as_sklearn(clf, test)


def test_a_nan_never_seen_in_training_goes_where_scikit_learn_sends_it() -> None:
    X = _rows(4000, seed=7)
    clf = HistGradientBoostingClassifier(max_iter=30, random_state=0, early_stopping=False)
    clf.fit(X, _labels(X, 8))
    _assert_same_as_sklearn(clf, _rows(2000, seed=9, nan_share=0.5))


def test_inputs_on_and_beside_every_threshold_go_the_same_way() -> None:
    X = _rows(5000, seed=10)
    clf = HistGradientBoostingClassifier(max_iter=40, random_state=0, early_stopping=False)
    clf.fit(X, _labels(X, 11))
    trees = compile_hgb(clf)
    edges = []
    for feature, threshold in zip(trees.features.ravel(), trees.thresholds.ravel(), strict=True):
        for value in (np.nextafter(threshold, -np.inf), threshold, np.nextafter(threshold, np.inf)):
            row = np.zeros(N, np.float32)
            row[feature] = value
            edges.append(row)
    _assert_same_as_sklearn(clf, np.array(edges, np.float32))


def test_the_tree_kernel_refuses_a_graph_of_another_layout() -> None:
    """A compiled graph without this layout's tensors is served by ONNX Runtime, not misread."""
    X = _rows(500, seed=4)
    clf = HistGradientBoostingClassifier(max_iter=5, random_state=0, early_stopping=False)
    model = to_onnx(compile_hgb(clf.fit(X, _labels(X, 4))))
    compile_gemm_graph(model, N)  # this layout reads
    kept = [t for t in model.graph.initializer if t.name != "leaf_offsets"]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    with pytest.raises(Unsupported, match="leaf_offsets"):
        compile_gemm_graph(model, N)


def test_single_leaf_trees_give_the_baseline() -> None:
    X = _rows(400, seed=12)
    y = _labels(X, 13)
    clf = HistGradientBoostingClassifier(
        max_iter=5, min_samples_leaf=len(X), random_state=0, early_stopping=False
    ).fit(X, y)
    trees = compile_hgb(clf)
    assert trees.paths.shape[1] == 1 and not trees.paths.any()  # no split anywhere
    _assert_same_as_sklearn(clf, _rows(100, seed=14))


def test_categorical_splits_are_refused() -> None:
    rng = np.random.default_rng(15)
    X = np.column_stack([rng.integers(0, 4, 2000), rng.normal(size=2000)]).astype(np.float32)
    y = (X[:, 0] == 2).astype(np.int64)
    clf = HistGradientBoostingClassifier(
        max_iter=5, categorical_features=[0], random_state=0, early_stopping=False
    ).fit(X, y)
    with pytest.raises(ModelRejected, match="categorical"):
        compile_hgb(clf)


def test_the_graph_holds_standard_operators_and_the_skl2onnx_interface() -> None:
    X = _rows(2000, seed=16)
    clf = HistGradientBoostingClassifier(max_iter=20, random_state=0).fit(X, _labels(X, 17))
    model = to_onnx(compile_hgb(clf))
    assert ml_operators(model) == [] and {o.domain for o in model.opset_import} == {""}
    reference = onnx.load_from_string(make_onnx_classifier(N, "hgb", max_iter=5))
    pairs = (
        (model.graph.input, reference.graph.input),
        (model.graph.output, reference.graph.output),
    )
    for ours, theirs in pairs:
        assert [(v.name, v.type) for v in ours] == [(v.name, v.type) for v in theirs]


@pytest.mark.parametrize("model_type", ["hgb-gemm", "mlp"])
def test_gpu_model_types_pass_parity_and_the_serving_checks(model_type: str) -> None:
    params = TrainParams(model_type=model_type)
    hp = params.hyperparameters
    if model_type == "mlp":
        hp.update(hidden_layer_sizes=[32, 32], max_iter=30)
    X, y = synthetic_rows(3000, N, seed=18)
    model = make_model(model_type, hp).fit(X, y)
    exported = export_onnx(model, X, model_type)
    assert ml_operators(exported) == []
    _, gap = check_parity(exported, model.predict_proba(X)[:, 1], X)
    assert gap <= 1e-5
    hgb = make_onnx_classifier(N, "hgb", max_iter=5)
    contract = validate(loaded(hgb, N).scorer, _golden(hgb), ValidationPolicy())
    # an hgb champion may be replaced by either GPU type: the same contract
    raw = exported.SerializeToString()
    served = loaded(raw, N).scorer
    assert served.engine == ("tree-kernel" if model_type == "hgb-gemm" else "onnxruntime")
    assert validate(loaded(raw, N).scorer, _golden(raw), ValidationPolicy(), contract) == contract


def _golden(model: bytes) -> GoldenRows:
    return GoldenRows.parse(orjson.dumps(golden_for(model, N)), N)


def test_compiled_trees_match_on_real_trades() -> None:
    raw = pd.read_parquet(TRADES)
    ticks = pd.DataFrame({
        "symbol": "XRP/ETH", "event_ns": raw["timestamp"].to_numpy(np.int64) * 1_000_000,
        "price": raw["price"], "quantity": raw["amount"], "is_buy": raw["side"] == "buy",
    })  # fmt: skip
    ds = build_dataset(ticks, FeatureSpec())
    X = ds.X.astype(np.float32)
    half = len(X) // 2
    clf = make_model("hgb-gemm", {**TrainParams().hgb, "max_iter": 60}).fit(X[:half], ds.y[:half])
    _assert_same_as_sklearn(clf, X[half:])
