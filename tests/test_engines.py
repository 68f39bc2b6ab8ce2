"""The engine router: crossover measured on fake engines, batches routed by size, GPU fenced."""

from __future__ import annotations

import numpy as np
import pytest

from inference.engines import EngineCosts, EngineRouter, GpuPolicy, build_router
from inference.testing import FakeClock, FakeEngine, loaded, make_onnx_classifier

N = 4


def _reference(rows: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-rows.sum(axis=1)))


def _pair(clock: FakeClock, gpu_bias: float = 0.0) -> tuple[FakeEngine, FakeEngine]:
    # CPU: 2 us + 1 us per row; GPU: 160 us launch + 0.01 us per row -> crossover ~160 rows
    cpu = FakeEngine("tree-kernel", clock, 2.0, 1.0, _reference)
    gpu = FakeEngine("cuda-graphs", clock, 160.0, 0.01, _reference, gpu_bias)
    return cpu, gpu


def test_the_crossover_is_where_the_gpu_becomes_cheaper_for_good() -> None:
    clock = FakeClock()
    cpu, gpu = _pair(clock)
    router = build_router(cpu, lambda: gpu, N, GpuPolicy(max_batch=1000, rounds=5), clock=clock)
    assert router.crossover == 256  # 162 + 256 > 160 + 2.6; at 128 the CPU's 130 us still wins
    assert router.costs is not None and router.costs.batches[-1] == 1024
    info = router.describe()
    assert info["engines"] == {"cpu": "tree-kernel", "gpu": "cuda-graphs"}
    assert info["crossover_batch"] == 256 and "256" in info["reason"]
    assert info["costs_us"]["1"] == {"cpu_us": 3.0, "gpu_us": 160.0}


def test_each_batch_goes_to_the_engine_its_size_calls_for() -> None:
    clock = FakeClock()
    cpu, gpu = _pair(clock)
    router = EngineRouter(cpu, gpu, crossover=64)
    for n in (1, 63, 64, 1000):
        rows = np.ones((n, N), np.float32)
        np.testing.assert_allclose(router.score(rows), _reference(rows))
    assert cpu.batches == [1, 63] and gpu.batches == [64, 1000]


def test_a_gpu_never_cheaper_serves_nothing() -> None:
    clock = FakeClock()
    cpu = FakeEngine("onnxruntime-cpu", clock, 1.0, 0.001, _reference)
    gpu = FakeEngine("cuda-graphs", clock, 160.0, 0.001, _reference)
    router = build_router(cpu, lambda: gpu, N, GpuPolicy(max_batch=64, rounds=3), clock=clock)
    assert router.crossover is None and router.describe()["engines"]["gpu"] is None
    measured = len(gpu.batches)  # the probe and the measurement
    router.score(np.ones((64, N), np.float32))
    assert len(gpu.batches) == measured and cpu.batches[-1] == 64


def test_a_gpu_that_is_cheaper_only_in_the_middle_does_not_count() -> None:
    costs = EngineCosts((1, 8, 64, 512), (5.0, 9.0, 40.0, 300.0), (60.0, 8.0, 50.0, 70.0))
    assert costs.crossover == 512


def test_a_gpu_engine_that_disagrees_is_fenced_off() -> None:
    clock = FakeClock()
    cpu, gpu = _pair(clock, gpu_bias=1e-4)
    router = build_router(cpu, lambda: gpu, N, GpuPolicy(max_batch=64, rounds=3), clock=clock)
    assert router.gpu is None and router.crossover is None
    assert "differ" in router.reason


def test_a_gpu_engine_that_fails_to_build_leaves_the_cpu_serving() -> None:
    clock = FakeClock()
    cpu, _ = _pair(clock)

    def broken() -> FakeEngine:
        raise RuntimeError("CUDA graph capture failed: node Foo on CPU\nmore detail")

    router = build_router(cpu, broken, N, GpuPolicy(), clock=clock)
    assert router.gpu is None and router.reason.endswith("node Foo on CPU")
    assert build_router(cpu, None, N, GpuPolicy(), "no CUDA here").reason == "no CUDA here"


@pytest.mark.parametrize("kind", ["hgb", "logistic"])
def test_a_cpu_only_scorer_reports_its_engine_and_why_no_gpu(kind: str) -> None:
    scorer = loaded(make_onnx_classifier(N, kind), N).scorer
    info = scorer.engines()
    assert scorer.router is None
    assert info["engines"] == {"cpu": scorer.engine, "gpu": None}
    assert info["crossover_batch"] is None and info["reason"] == "GPU disabled by config"


def _mlp(seed: int = 3) -> bytes:
    from inference.testing import synthetic_rows
    from training.models import export_onnx, make_model

    X, y = synthetic_rows(1000, N, seed)
    from training.params import TrainParams

    hp = {**TrainParams().mlp, "hidden_layer_sizes": [16]}
    model = make_model("mlp", hp).fit(X, y)
    return bytes(export_onnx(model, X, "mlp").SerializeToString())


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_a_scorer_routes_between_a_cpu_session_and_its_gpu_engine() -> None:
    from dataclasses import replace

    import onnxruntime as ort

    from inference.engines import FunctionEngine

    model = _mlp()
    scorer = loaded(model, N).scorer
    assert scorer.engine == "onnxruntime"  # no kernel covers an MLP: a CPU session serves
    # stand-in for the device engine (the CUDA paths run on a GPU machine, in bench.gpu)
    fake_gpu = FunctionEngine("cuda-io-binding", scorer.run_session)
    routed = replace(scorer, binding=fake_gpu)._with_router(  # type: ignore[arg-type]
        model, N, ort.SessionOptions(), GpuPolicy(cuda_graphs=False, max_batch=64, rounds=3)
    )
    info = routed.engines()
    assert routed.router is not None and info["engines"]["cpu"] == "onnxruntime-cpu"
    assert set(info["costs_us"]) == {"1", "2", "4", "8", "16", "32", "64"}
    assert info["reason"].startswith("measured")
    rows = np.random.default_rng(4).normal(size=(100, N)).astype(np.float32)
    np.testing.assert_allclose(routed.score(rows), scorer.score(rows), rtol=0, atol=1e-7)


def test_a_graph_with_ml_operators_stays_on_the_cpu_and_says_why() -> None:
    import onnxruntime as ort

    model = make_onnx_classifier(N, "hgb")
    scorer = loaded(model, N).scorer
    routed = scorer._with_router(model, N, ort.SessionOptions(), GpuPolicy())
    info = routed.engines()
    assert info["engines"] == {"cpu": "tree-kernel", "gpu": None}
    assert "TreeEnsembleClassifier" in info["reason"] and "no CUDA kernels" in info["reason"]
