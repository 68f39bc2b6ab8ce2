"""GPU check: the ONNX scorer on CUDA (and TensorRT if present) against the CPU provider.

For batch sizes 1..8192 prints rows/s and p50/p99 per batch for each provider, for
CUDA also through the scorer's I/O binding (`inference.session.DeviceBinding`, what
the batcher uses there) and the host->device->host copy time of the inputs, and the
tree kernel (`inference.trees`, CPU) on the same model. On a
machine without a usable CUDA provider it says so and exits 0: the project never
needs a GPU. Run: python -m bench.gpu [--rounds 200]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort

BATCHES = (1, 8, 64, 256, 1024, 4096, 8192)


def model_bytes(n_features: int, trees: int = 200) -> bytes:
    """A 200-tree gradient-boosted classifier exported with skl2onnx (fixed seed)."""
    from skl2onnx import to_onnx
    from sklearn.ensemble import HistGradientBoostingClassifier

    rng = np.random.default_rng(0)
    X = rng.normal(size=(20_000, n_features)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] + rng.normal(size=len(X)) > 0).astype(int)
    clf = HistGradientBoostingClassifier(max_iter=trees, random_state=0).fit(X, y)
    onnx = to_onnx(clf, X[:1], options={id(clf): {"zipmap": False}},
                   target_opset={"": 17, "ai.onnx.ml": 3})  # fmt: skip
    return onnx.SerializeToString()  # type: ignore[no-any-return]


def _timed(label: str, batch: int, rounds: int, call: object) -> str:
    for _ in range(10):
        call()  # type: ignore[operator]
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        call()  # type: ignore[operator]
        times.append(time.perf_counter_ns() - t0)
    arr = np.asarray(times) / 1e3
    rate = batch / (np.median(arr) / 1e6)
    p50, p99 = np.percentile(arr, [50, 99])
    return (f"{label:<28} batch {batch:>5}: {rate:>12,.0f} rows/s  "
            f"p50 {p50:9.1f} us  p99 {p99:9.1f} us")  # fmt: skip


def time_engines(model: bytes, rounds: int, n_features: int) -> list[str]:
    """Table rows for the tree kernel (CPU) and, where CUDA works, the I/O-bound session."""
    from inference.session import DeviceBinding, OnnxScorer, choose_providers

    scorer = OnnxScorer.from_bytes(model, n_features, prefer_gpu=False)
    rows = []
    rng = np.random.default_rng(1)
    binding = None
    providers, _ = choose_providers(prefer_gpu=True)  # quiet where CUDA is not loadable
    if providers[0] == "CUDAExecutionProvider":
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(model, options, providers=list(providers))
        binding = DeviceBinding(session, session.get_inputs()[0].name, scorer.prob_output,
                                "cuda", n_features)  # fmt: skip
    for batch in BATCHES:
        x = rng.normal(size=(batch, n_features)).astype(np.float32)
        if scorer.trees is not None:
            rows.append(_timed("tree kernel (CPU)", batch, rounds, lambda x=x: scorer.score(x)))
        if binding is not None:
            rows.append(_timed("CUDA + I/O binding", batch, rounds, lambda x=x: binding.run(x)))
    return rows


def time_provider(model: bytes, provider: str, rounds: int, n_features: int) -> list[str]:
    """Table rows for one provider."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model, sess_options=options, providers=[provider])
    if session.get_providers()[0] != provider:
        return [f"{provider:<28} not usable here (fell back to {session.get_providers()[0]})"]
    name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]
    rows = []
    rng = np.random.default_rng(1)
    for batch in BATCHES:
        x = rng.normal(size=(batch, n_features)).astype(np.float32)
        for _ in range(10):
            session.run(outputs, {name: x})
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter_ns()
            session.run(outputs, {name: x})
            times.append(time.perf_counter_ns() - t0)
        arr = np.asarray(times) / 1e3
        copy = ""
        if provider != "CPUExecutionProvider":
            t0 = time.perf_counter_ns()
            for _ in range(rounds):
                on_device = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
                on_device.numpy()
            copy = f"  copy h->d->h {(time.perf_counter_ns() - t0) / rounds / 1e3:8.1f} us"
        rows.append(
            f"{provider:<28} batch {batch:>5}: {batch / (np.median(arr) / 1e6):>12,.0f} rows/s  "
            f"p50 {np.percentile(arr, 50):9.1f} us  p99 {np.percentile(arr, 99):9.1f} us{copy}"
        )
    return rows


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--features", type=int, default=12)
    args = parser.parse_args()
    available = ort.get_available_providers()
    print(f"onnxruntime {ort.__version__}, device {ort.get_device()}, providers {available}")
    model = model_bytes(args.features)
    providers = ["CPUExecutionProvider"]
    for gpu in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        if gpu in available:
            providers.append(gpu)
    if len(providers) == 1:
        print("no CUDA/TensorRT provider in this onnxruntime build: CPU figures only")
    for provider in providers:
        for row in time_provider(model, provider, args.rounds, args.features):
            print(row, flush=True)
    for row in time_engines(model, args.rounds, args.features):
        print(row, flush=True)


if __name__ == "__main__":
    main()
