"""GPU check: the ONNX scorer on CUDA (and TensorRT if present) against the CPU provider.

Two models, both exported with skl2onnx from fixed-seed data: the project's own kind
(a 200-tree gradient-boosted classifier, whose `ai.onnx.ml` tree operator has no CUDA
kernel, so ONNX Runtime places it on the CPU whichever provider is asked for) and an
MLP of standard operators (MatMul, Relu, ...) that does run on the GPU. For each model
and batch sizes 1..8192 it prints rows/s and p50/p99 per batch for each provider, for
CUDA also through the scorer's I/O binding (`inference.session.DeviceBinding`, what the
batcher uses there) and the host->device->host copy time of the inputs, the tree
kernel (`inference.trees`, CPU) where it covers the model, and where each provider
placed the graph's nodes (from ONNX Runtime's own profile). Then a serving check: for
those two and a logistic regression, what `OnnxScorer` serves with when a GPU is asked
for, and how far the MicroBatcher's scores on it are from the CPU session's.

On a machine without a usable CUDA provider it says so and prints the CPU rows: the
project never needs a GPU.

Run: python -m bench.gpu [--rounds 200] [--json out.json]
     python -m bench.gpu --write-models DIR   (then --models DIR where skl2onnx is missing)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort

BATCHES = (1, 8, 64, 256, 1024, 4096, 8192)
MODELS = ("trees", "mlp", "logistic")
TIMED = ("trees", "mlp")  # the logistic only joins the serving check


def model_bytes(name: str, n_features: int) -> bytes:
    """The benchmark model `name` (one of MODELS), exported with skl2onnx (fixed seed)."""
    from skl2onnx import to_onnx
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    X = rng.normal(size=(20_000, n_features)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] + rng.normal(size=len(X)) > 0).astype(int)
    if name == "trees":
        clf = HistGradientBoostingClassifier(max_iter=200, random_state=0)
    elif name == "logistic":
        clf = make_pipeline(StandardScaler(), LogisticRegression())
    else:
        clf = MLPClassifier(hidden_layer_sizes=(512, 512, 512), max_iter=5, random_state=0)
    clf.fit(X, y)
    onnx = to_onnx(clf, X[:1], options={id(clf): {"zipmap": False}},
                   target_opset={"": 17, "ai.onnx.ml": 3})  # fmt: skip
    return onnx.SerializeToString()  # type: ignore[no-any-return]


def load_models(directory: Path | None, n_features: int) -> dict[str, bytes]:
    """The models from `directory` where they were written, else built here."""
    models = {}
    for name in MODELS:
        path = directory / f"{name}.onnx" if directory else None
        models[name] = (
            path.read_bytes() if path and path.exists() else model_bytes(name, n_features)
        )
    return models


def _session(model: bytes, provider: str, profile_dir: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if profile_dir:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(profile_dir, "placement")
    return ort.InferenceSession(model, sess_options=options, providers=[provider])


def placement(model: bytes, provider: str, n_features: int) -> str:
    """How many of the graph's nodes ran on each provider, from one profiled run."""
    with tempfile.TemporaryDirectory() as tmp:
        session = _session(model, provider, tmp)
        x = np.zeros((64, n_features), np.float32)
        session.run(None, {session.get_inputs()[0].name: x})
        events = json.loads(Path(session.end_profiling()).read_text())
    nodes = {e["name"]: e["args"].get("provider", "?") for e in events
             if e.get("cat") == "Node" and "provider" in e.get("args", {})}  # fmt: skip
    counts = Counter(nodes.values())
    return ", ".join(f"{n} on {p.removesuffix('ExecutionProvider')}" for p, n in counts.items())


def _timed(call: Callable[[], object], rounds: int) -> np.ndarray:
    for _ in range(10):
        call()
    times = np.empty(rounds)
    for i in range(rounds):
        t0 = time.perf_counter_ns()
        call()
        times[i] = time.perf_counter_ns() - t0
    return times / 1e3


def _row(model: str, engine: str, batch: int, us: np.ndarray, copy_us: float | None) -> dict:
    p50, p99 = np.percentile(us, [50, 99])
    return {"model": model, "engine": engine, "batch": batch,
            "rows_per_s": batch / (p50 / 1e6), "p50_us": p50, "p99_us": p99,
            "copy_us": copy_us}  # fmt: skip


def time_provider(model: bytes, name: str, provider: str, rounds: int,
                  n_features: int) -> list[dict]:  # fmt: skip
    """Rows for `session.run` on one provider (all of the machine's cores for ORT's pool)."""
    session = _session(model, provider)
    input_name = session.get_inputs()[0].name
    rng = np.random.default_rng(1)
    rows = []
    for batch in BATCHES:
        x = rng.normal(size=(batch, n_features)).astype(np.float32)
        us = _timed(partial(session.run, None, {input_name: x}), rounds)
        copy_us = None
        if provider != "CPUExecutionProvider":

            def copy(x: np.ndarray = x) -> None:
                ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0).numpy()

            copy_us = float(np.median(_timed(copy, rounds)))
        rows.append(_row(name, provider.removesuffix("ExecutionProvider"), batch, us, copy_us))
    return rows


def time_engines(model: bytes, name: str, rounds: int, n_features: int) -> list[dict]:
    """Rows for the tree kernel (CPU) where it covers the model, and the CUDA I/O binding."""
    from inference.session import DeviceBinding, OnnxScorer, choose_providers

    scorer = OnnxScorer.from_bytes(model, n_features, prefer_gpu=False)
    binding = None
    providers, _ = choose_providers(prefer_gpu=True)  # quiet where CUDA is not loadable
    if providers[0] == "CUDAExecutionProvider":
        session = _session(model, "CUDAExecutionProvider")
        binding = DeviceBinding(session, session.get_inputs()[0].name, scorer.prob_output,
                                "cuda", n_features)  # fmt: skip
    rng = np.random.default_rng(1)
    rows = []
    for batch in BATCHES:
        x = rng.normal(size=(batch, n_features)).astype(np.float32)
        if scorer.trees is not None:
            us = _timed(partial(scorer.score, x), rounds)
            rows.append(_row(name, "tree kernel", batch, us, None))
        if binding is not None:
            us = _timed(partial(binding.run, x), rounds)
            rows.append(_row(name, "CUDA + I/O binding", batch, us, None))
    return rows


def serving_check(models: dict[str, bytes], n_features: int) -> list[str]:
    """What serving does with each model where a GPU is asked for, against the CPU session.

    Per model: the provider and engine `OnnxScorer` picks with `prefer_gpu=True`, and
    the largest P(up) gap over 4,096 rows between the MicroBatcher on that scorer and
    the CPU session, and between the GPU session itself and the CPU session.
    """
    from inference.batcher import MicroBatcher
    from inference.registry import LoadedModel
    from inference.session import OnnxScorer

    rows = np.random.default_rng(3).normal(size=(4096, n_features)).astype(np.float32)
    lines = []
    for name, model in models.items():
        served = OnnxScorer.from_bytes(model, n_features, prefer_gpu=True)
        cpu = OnnxScorer.from_bytes(model, n_features, prefer_gpu=False, numba_kernels=False)
        batcher = MicroBatcher(LoadedModel(name, "1", "champion", "", served, 0), n_features)
        reference = cpu.score(rows)
        scores = batcher.score_batch(rows, np.full(len(rows), time.time_ns())).scores
        batcher_gap = float(np.max(np.abs(scores - reference)))
        session_gap = float(np.max(np.abs(served.run_session(rows) - reference)))
        lines.append(f"{name:<8} served on {served.provider}, engine {served.engine}: "
                     f"batcher vs CPU session max gap {batcher_gap:.1e}, "
                     f"its session vs CPU session {session_gap:.1e}")  # fmt: skip
    return lines


def _print(row: dict) -> None:
    copy = f"  copy h->d->h {row['copy_us']:8.1f} us" if row["copy_us"] is not None else ""
    print(f"{row['model']:<6} {row['engine']:<20} batch {row['batch']:>5}: "
          f"{row['rows_per_s']:>12,.0f} rows/s  p50 {row['p50_us']:9.1f} us  "
          f"p99 {row['p99_us']:9.1f} us{copy}", flush=True)  # fmt: skip


def main() -> None:
    """Print the table (and write it as JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--features", type=int, default=12)
    parser.add_argument("--models", type=Path, help="read <name>.onnx from here if present")
    parser.add_argument("--write-models", type=Path, help="write the models here and stop")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    if args.write_models:
        args.write_models.mkdir(parents=True, exist_ok=True)
        for name in MODELS:
            (args.write_models / f"{name}.onnx").write_bytes(model_bytes(name, args.features))
        return
    available = ort.get_available_providers()
    print(f"onnxruntime {ort.__version__}, device {ort.get_device()}, providers {available}, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    providers = ["CPUExecutionProvider"]
    for gpu in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        if gpu in available:
            providers.append(gpu)
    if len(providers) == 1:
        print("no CUDA/TensorRT provider in this onnxruntime build: CPU figures only")
    models = load_models(args.models, args.features)
    rows: list[dict] = []
    for name, model in models.items():
        if name not in TIMED:
            continue
        for provider in providers:
            try:
                where = placement(model, provider, args.features)
                session_provider = _session(model, provider).get_providers()[0]
            except Exception as exc:  # noqa: BLE001 -- a provider that fails to load is a finding
                print(f"{name:<6} {provider}: does not load here ({exc})".splitlines()[0])
                continue
            if session_provider != provider:
                print(f"{name:<6} {provider}: not usable here (fell back to {session_provider})")
                continue
            print(f"{name:<6} {provider}: nodes {where}")
            for row in time_provider(model, name, provider, args.rounds, args.features):
                rows.append(row)
                _print(row)
        for row in time_engines(model, name, args.rounds, args.features):
            rows.append(row)
            _print(row)
    checks = serving_check(models, args.features)
    print("\n".join(checks))
    if args.json:
        args.json.write_text(json.dumps({"onnxruntime": ort.__version__, "rows": rows,
                                         "serving": checks}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
