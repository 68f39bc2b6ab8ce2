"""OnnxScorer: the GPU I/O binding path scores what session.run scores (exercised on the CPU)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from features.spec import FeatureSpec
from inference.session import DeviceBinding, OnnxScorer
from inference.testing import make_onnx_classifier, synthetic_rows

N_FEATURES = FeatureSpec().n_features


@pytest.mark.parametrize("kind", ["logistic", "hgb"])
def test_device_binding_scores_what_session_run_scores(kind: str) -> None:
    # On a GPU the binding's tensors live on "cuda"; the same code runs here on "cpu".
    params = {"max_iter": 30} if kind == "hgb" else {}
    raw = make_onnx_classifier(N_FEATURES, kind, seed=4, **params)
    scorer = OnnxScorer.from_bytes(raw, N_FEATURES, prefer_gpu=False, numba_kernels=False)
    assert scorer.binding is None  # CPU sessions run plainly
    binding = DeviceBinding(scorer.session, scorer.input_name, scorer.prob_output, "cpu",
                            N_FEATURES)  # fmt: skip
    X, _ = synthetic_rows(1000, N_FEATURES, seed=6)
    for n in (1, 3, 64, 65, 1000, 7, 1):  # padded into buckets 1, 4, 64, 128, 1024, 8
        got = binding.run(X[:n])
        assert got.shape == (n,)
        assert np.array_equal(got, scorer.run_session(X[:n]))
    assert sorted(binding._buckets) == [1, 4, 8, 64, 128, 1024]


def test_tensorrt_is_asked_for_only_where_it_can_load() -> None:
    import ctypes

    from inference.session import _TENSORRT_LIB, _with_tensorrt

    cuda = ("CUDAExecutionProvider", "CPUExecutionProvider")
    providers, reason = _with_tensorrt(cuda, "CUDA libraries loadable")
    try:
        ctypes.CDLL(_TENSORRT_LIB)
        loadable = "TensorrtExecutionProvider" in ort.get_available_providers()
    except OSError:
        loadable = False
    if loadable:
        assert providers == ("TensorrtExecutionProvider", *cuda)
    else:  # this machine: CUDA stays first, and the reason says why TensorRT is not used
        assert providers == cuda
        assert "TensorRT asked for but" in reason
