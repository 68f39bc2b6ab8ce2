"""TreeKernel: the P(up) of ONNX Runtime at any batch size; what it does not cover falls back."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from features.spec import FeatureSpec
from inference.session import OnnxScorer
from inference.testing import make_onnx_classifier, synthetic_rows
from inference.trees import (
    PROBE_TOLERANCE,
    Unsupported,
    compile_tree_kernel,
    probe_rows,
)

N_FEATURES = FeatureSpec().n_features


def _hgb(seed: int, **params: object) -> bytes:
    return make_onnx_classifier(N_FEATURES, "hgb", seed=seed, n_rows=4000, max_iter=60,
                                early_stopping=False, **params)  # fmt: skip


@pytest.fixture(scope="module")
def hgb() -> bytes:
    return _hgb(3, max_leaf_nodes=31)


def _rows_with_nan(n: int, seed: int) -> np.ndarray:
    X, _ = synthetic_rows(n, N_FEATURES, seed)
    X[np.random.default_rng(seed).random(X.shape) < 0.05] = np.nan
    return X


def test_kernel_scores_what_onnxruntime_scores(hgb: bytes) -> None:
    scorer = OnnxScorer.from_bytes(hgb, N_FEATURES, prefer_gpu=False)
    assert scorer.engine == "tree-kernel"
    assert scorer.trees is not None and scorer.trees.n_trees == 60
    X = _rows_with_nan(5000, seed=8)
    gap = np.abs(scorer.score(X) - scorer.run_session(X))
    assert gap.max() <= PROBE_TOLERANCE
    probe = probe_rows(scorer.trees, seed=4)
    assert np.abs(scorer.score(probe) - scorer.run_session(probe)).max() <= PROBE_TOLERANCE


def test_kernel_routes_missing_values_as_the_model_learned() -> None:
    X, y = synthetic_rows(4000, N_FEATURES, seed=6)
    from skl2onnx import to_onnx
    from sklearn.ensemble import HistGradientBoostingClassifier

    X[::3, 0] = np.nan  # trained with NaNs: some splits send them left, some right
    clf = HistGradientBoostingClassifier(max_iter=30, random_state=0).fit(X, y)
    model = to_onnx(clf, X[:1], options={id(clf): {"zipmap": False}},
                    target_opset={"": 17, "ai.onnx.ml": 3})  # fmt: skip
    scorer = OnnxScorer.from_bytes(model.SerializeToString(), N_FEATURES, prefer_gpu=False)
    assert scorer.trees is not None
    assert scorer.trees.nan_true.any() and not scorer.trees.nan_true.all()
    rows = _rows_with_nan(3000, seed=9)
    native = clf.predict_proba(rows)[:, 1]
    assert np.abs(scorer.score(rows) - native).max() <= 1e-5


def test_scores_are_the_same_at_every_batch_size(hgb: bytes) -> None:
    scorer = OnnxScorer.from_bytes(hgb, N_FEATURES, prefer_gpu=False)
    X = _rows_with_nan(1000, seed=10)
    whole = scorer.score(X)
    one_by_one = np.concatenate([scorer.score(X[i : i + 1]) for i in range(len(X))])
    uneven = np.concatenate([scorer.score(X[a:b]) for a, b in ((0, 7), (7, 8), (8, 1000))])
    assert np.array_equal(whole, one_by_one)
    assert np.array_equal(whole, uneven)


def test_strict_splits_are_compared_strictly(hgb: bytes) -> None:
    model = onnx.load_from_string(hgb)
    for attr in model.graph.node[0].attribute:
        if attr.name == "nodes_modes":
            attr.strings[:] = [b"BRANCH_LT" if m == b"BRANCH_LEQ" else m for m in attr.strings]
    strict = model.SerializeToString()
    scorer = OnnxScorer.from_bytes(strict, N_FEATURES, prefer_gpu=False)
    assert scorer.trees is not None and scorer.trees.strict.all()
    probe = probe_rows(scorer.trees, seed=2)  # rows exactly on the thresholds tell < from <=
    assert np.abs(scorer.score(probe) - scorer.run_session(probe)).max() <= PROBE_TOLERANCE
    lenient = OnnxScorer.from_bytes(hgb, N_FEATURES, prefer_gpu=False)
    assert np.abs(scorer.score(probe) - lenient.score(probe)).max() > 1e-3


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (lambda: make_onnx_classifier(N_FEATURES, "logistic", seed=1), "not one TreeEnsemble"),
        (lambda: _hgb(5, max_leaf_nodes=100, min_samples_leaf=2), "leaves > 64"),
    ],
    ids=["logistic", "too-many-leaves"],
)
def test_models_it_does_not_cover_are_scored_by_onnxruntime(model: object, reason: str) -> None:
    raw = model()  # type: ignore[operator]
    with pytest.raises(Unsupported, match=reason):
        compile_tree_kernel(onnx.load_from_string(raw), N_FEATURES)
    scorer = OnnxScorer.from_bytes(raw, N_FEATURES, prefer_gpu=False)
    assert scorer.trees is None
    assert scorer.engine != "tree-kernel"  # the logistic goes to inference.linear
    X, _ = synthetic_rows(10, N_FEATURES, seed=1)
    assert np.isfinite(scorer.score(X)).all()


def test_a_kernel_that_disagrees_with_the_session_is_not_used(hgb: bytes) -> None:
    session_only = OnnxScorer.from_bytes(hgb, N_FEATURES, prefer_gpu=False, numba_kernels=False)
    assert session_only.engine == "onnxruntime"
    # the kernel of another model against this session: the probe rows must catch it
    other = _hgb(4, max_leaf_nodes=31)
    guarded = session_only._with_tree_kernel(other, N_FEATURES)
    assert guarded.engine == "onnxruntime"
    assert session_only._with_tree_kernel(hgb, N_FEATURES).engine == "tree-kernel"
