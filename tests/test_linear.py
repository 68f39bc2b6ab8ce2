"""LinearKernel: ONNX Runtime's P(up) for logistic models; what it does not cover falls back."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from features.spec import FeatureSpec
from inference.linear import (
    MAX_MODEL_BYTES,
    compile_from_bytes,
    compile_linear_kernel,
    probe_rows,
)
from inference.session import OnnxScorer
from inference.testing import make_onnx_classifier, synthetic_rows
from inference.trees import PROBE_TOLERANCE, Unsupported

N_FEATURES = FeatureSpec().n_features


def _bare_logistic(seed: int) -> bytes:
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    X, y = synthetic_rows(2000, N_FEATURES, seed)
    clf = LogisticRegression(max_iter=1000).fit(X, y)
    model = to_onnx(clf, X[:1], options={id(clf): {"zipmap": False}},
                    target_opset={"": 17, "ai.onnx.ml": 3})  # fmt: skip
    return model.SerializeToString()  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "model",
    [
        lambda: make_onnx_classifier(N_FEATURES, "logistic", seed=1),  # Scaler -> Linear
        lambda: make_onnx_classifier(N_FEATURES, "logistic", seed=2, C=100.0),
        lambda: make_onnx_classifier(N_FEATURES, "logistic", seed=4, C=0.01),
        lambda: _bare_logistic(3),  # LinearClassifier alone
    ],
    ids=["pipeline", "weakly-regularised", "strongly-regularised", "bare"],
)
def test_kernel_scores_what_onnxruntime_scores(model: object) -> None:
    scorer = OnnxScorer.from_bytes(model(), N_FEATURES, prefer_gpu=False)  # type: ignore[operator]
    assert scorer.engine == "linear-kernel"
    assert scorer.linear is not None
    X, _ = synthetic_rows(5000, N_FEATURES, seed=8)
    X[np.random.default_rng(8).random(X.shape) < 0.05] = np.nan
    for rows in (X, probe_rows(scorer.linear, seed=4), X[:1]):
        ours, theirs = scorer.score(rows), scorer.run_session(rows)
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
        assert np.nanmax(np.abs(ours - theirs)) <= PROBE_TOLERANCE
    assert np.isnan(scorer.score(X)).any()  # a NaN feature gives NaN, as in ORT


def test_batch_size_one_equals_batch_size_n() -> None:
    scorer = OnnxScorer.from_bytes(make_onnx_classifier(N_FEATURES, "logistic", seed=5),
                                   N_FEATURES, prefer_gpu=False)  # fmt: skip
    X, _ = synthetic_rows(64, N_FEATURES, seed=9)
    whole = scorer.score(X)
    one_by_one = np.concatenate([scorer.score(X[i : i + 1]) for i in range(len(X))])
    np.testing.assert_array_equal(whole, one_by_one)


def test_models_it_does_not_cover_are_left_to_their_engine() -> None:
    hgb = make_onnx_classifier(N_FEATURES, "hgb", seed=1, max_iter=20)
    with pytest.raises(Unsupported, match="not \\[Scaler ->\\] LinearClassifier"):
        compile_linear_kernel(onnx.load_from_string(hgb), N_FEATURES)
    with pytest.raises(Unsupported, match="larger than any linear model"):
        compile_from_bytes(b"\0" * (MAX_MODEL_BYTES + 1), N_FEATURES)  # not even parsed
    raw = make_onnx_classifier(N_FEATURES, "logistic", seed=1)
    model = onnx.load_from_string(raw)
    classifier = model.graph.node[-1]
    for attr in classifier.attribute:
        if attr.name == "post_transform":
            attr.s = b"NONE"  # raw scores: not a probability the kernel computes
    with pytest.raises(Unsupported, match="post_transform NONE"):
        compile_linear_kernel(model, N_FEATURES)
    scorer = OnnxScorer.from_bytes(model.SerializeToString(), N_FEATURES, prefer_gpu=False)
    assert scorer.engine == "onnxruntime"
    off = OnnxScorer.from_bytes(raw, N_FEATURES, prefer_gpu=False, numba_kernels=False)
    assert off.engine == "onnxruntime"  # TICKSERVE_NUMBA_KERNELS=false: ORT for everything


def test_a_kernel_that_disagrees_with_the_session_is_not_used() -> None:
    raw = make_onnx_classifier(N_FEATURES, "logistic", seed=1)
    session_only = OnnxScorer.from_bytes(raw, N_FEATURES, prefer_gpu=False, numba_kernels=False)
    other = make_onnx_classifier(N_FEATURES, "logistic", seed=2)
    assert session_only._with_linear_kernel(other, N_FEATURES).engine == "onnxruntime"
    probe = np.zeros((4, N_FEATURES), np.float32)
    reference = session_only.run_session(probe)
    assert session_only._agrees(reference + PROBE_TOLERANCE / 2, probe, "test")
    assert not session_only._agrees(reference + 1e-3, probe, "test")
    probe[0, 0] = np.nan  # NaN on both sides agrees; NaN on one side does not
    reference = session_only.run_session(probe)
    assert np.isnan(reference[0])
    assert session_only._agrees(reference.copy(), probe, "test")
    assert not session_only._agrees(np.nan_to_num(reference), probe, "test")
