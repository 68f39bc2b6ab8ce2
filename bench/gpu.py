"""GPU check: the GPU model types on CPU, CUDA, CUDA + I/O binding, CUDA graphs and TensorRT.

Models (fixed seeds, 12 features, 20,000 synthetic rows; written by `--write-models`):

- `mlp`: what `tickserve train --model mlp` makes (params.yaml's defaults), standard
  operators only (`training.standard_ops`);
- `gemm`: a 200-tree HistGradientBoosting (no early stopping) compiled to tensor
  operators by `training.compile_trees` (`--model hgb-gemm`);
- `trees`: the same kind exported by skl2onnx (`ai.onnx.ml` TreeEnsemble, no CUDA
  kernel): the CPU tree kernel's reference;
- `logistic`: joins the serving check only.

For each timed model and batch sizes 1..8192 it prints rows/s and p50/p99 per batch for
every engine present: ONNX Runtime on the CPU (all cores), the tree kernel where it
covers the model, CUDA (`session.run`), CUDA + I/O binding (`inference.session.DeviceBinding`),
CUDA graphs (`inference.cuda.CudaGraphEngine`, pinned staging) and TensorRT (one engine
for the whole 1..8192 profile); each engine's largest P(up) gap to the CPU session;
where the nodes ran. Then the serving check: `OnnxScorer` as serving builds it with a
GPU asked for (engines, crossover measured at load, reason, costs) and the MicroBatcher
on it against the CPU session.

Each (engine, batch) cell runs at most `--rounds` calls or `--cell-s` seconds, so the
whole run fits in about three minutes on a GPU machine. Without a usable CUDA provider
it says so and prints the CPU rows: the project never needs a GPU.

Run: python -m bench.gpu [--rounds 200] [--json out.json] [--serving] [--no-tensorrt]
     python -m bench.gpu --write-models DIR   (needs scikit-learn and skl2onnx)
     python -m bench.gpu --models DIR         (needs only numpy, onnx, onnxruntime(-gpu),
                                               numba, prometheus-client)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

BATCHES = (1, 8, 64, 256, 1024, 4096, 8192)
MODELS = ("mlp", "gemm", "trees", "logistic")
TIMED = ("mlp", "gemm", "trees")
N_FEATURES = 12
Row = dict[str, Any]


def model_bytes(name: str, n_features: int = N_FEATURES) -> bytes:
    """The benchmark model `name` (one of MODELS), trained and exported as `training/` does."""
    from dataclasses import replace

    from training.models import export_onnx, make_model
    from training.params import TrainParams

    rng = np.random.default_rng(0)
    X = rng.normal(size=(20_000, n_features)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] * X[:, 2] + rng.normal(size=len(X)) > 0).astype(np.int64)
    model_type = {"gemm": "hgb-gemm", "trees": "hgb"}.get(name, name)
    params = replace(TrainParams(), model_type=model_type)
    hp = params.hyperparameters
    if model_type.startswith("hgb"):
        hp["early_stopping"] = False  # all 200 trees: the size the params allow
    model = make_model(model_type, hp).fit(X, y)
    return bytes(export_onnx(model, X, model_type).SerializeToString())


def load_models(directory: Path | None) -> dict[str, bytes]:
    """The models from `directory` where they were written, else built here."""
    models = {}
    for name in MODELS:
        path = directory / f"{name}.onnx" if directory else None
        models[name] = path.read_bytes() if path and path.exists() else model_bytes(name)
    return models


# -- sessions ------------------------------------------------------------------------


def _options(profile_dir: str | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if profile_dir:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(profile_dir, "placement")
    return options


def _provider(name: str, cache_dir: str) -> Any:
    from inference.cuda import cuda_provider

    if name == "CUDAExecutionProvider":
        return cuda_provider()
    if name == "TensorrtExecutionProvider":
        return (
            name,
            {
                "trt_profile_min_shapes": f"X:1x{N_FEATURES}",
                "trt_profile_opt_shapes": f"X:1024x{N_FEATURES}",
                "trt_profile_max_shapes": f"X:{BATCHES[-1]}x{N_FEATURES}",
                "trt_engine_cache_enable": "1",
                "trt_engine_cache_path": cache_dir,
            },
        )
    return name


def session(model: bytes, provider: str, cache_dir: str, profile: str | None = None) -> Any:
    """A session on `provider` (CUDA with TF32 off; TensorRT with one 1..8192 profile)."""
    chain = [_provider(provider, cache_dir)]
    if provider == "TensorrtExecutionProvider":
        chain.append(_provider("CUDAExecutionProvider", cache_dir))
    return ort.InferenceSession(model, sess_options=_options(profile), providers=chain)


def placement(model: bytes, provider: str, cache_dir: str) -> str:
    """How many of the graph's nodes ran on each provider, from one profiled run."""
    with tempfile.TemporaryDirectory() as tmp:
        s = session(model, provider, cache_dir, tmp)
        s.run(None, {s.get_inputs()[0].name: np.zeros((64, N_FEATURES), np.float32)})
        events = json.loads(Path(s.end_profiling()).read_text())
    nodes = {
        e["name"]: e["args"]["provider"]
        for e in events
        if e.get("cat") == "Node" and "provider" in e.get("args", {})
    }
    counts = Counter(nodes.values())
    return ", ".join(f"{n} on {p.removesuffix('ExecutionProvider')}" for p, n in counts.items())


def _session_engine(s: Any) -> Callable[[np.ndarray], np.ndarray]:
    name = s.get_inputs()[0].name
    prob = next(o.name for o in s.get_outputs() if "prob" in o.name)

    def score(rows: np.ndarray) -> np.ndarray:
        return np.asarray(s.run([prob], {name: rows})[0][:, 1], np.float64)

    return score


def engines(
    name: str, model: bytes, providers: list[str], cache_dir: str
) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Every engine that builds here for `model`, by name; a failure is printed, not fatal."""
    from inference.cuda import CudaGraphEngine
    from inference.session import DeviceBinding, OnnxScorer

    built: dict[str, Callable[[np.ndarray], np.ndarray]] = {}

    def add(engine: str, make: Callable[[], Callable[[np.ndarray], np.ndarray]]) -> None:
        try:
            built[engine] = make()
            built[engine](np.zeros((1, N_FEATURES), np.float32))
        except Exception as exc:  # noqa: BLE001 -- an engine that does not build is a finding
            print(f"{name:<8} {engine}: not built here ({exc})".splitlines()[0], flush=True)

    add("CPU", lambda: _session_engine(session(model, "CPUExecutionProvider", cache_dir)))
    scorer = OnnxScorer.from_bytes(model, N_FEATURES, prefer_gpu=False)
    if scorer.trees is not None:
        built["tree kernel"] = scorer.trees.score
    if "CUDAExecutionProvider" in providers:

        def binding() -> Callable[[np.ndarray], np.ndarray]:
            s = session(model, "CUDAExecutionProvider", cache_dir)
            input_name = s.get_inputs()[0].name
            return DeviceBinding(s, input_name, scorer.prob_output, "cuda", N_FEATURES).run

        add("CUDA", lambda: _session_engine(session(model, "CUDAExecutionProvider", cache_dir)))
        add("CUDA + I/O binding", binding)
        add("CUDA graphs", lambda: CudaGraphEngine(model, N_FEATURES, BATCHES[-1]).score)
    if "TensorrtExecutionProvider" in providers:

        def tensorrt() -> Callable[[np.ndarray], np.ndarray]:
            s = session(model, "TensorrtExecutionProvider", cache_dir)
            if s.get_providers()[0] != "TensorrtExecutionProvider":
                raise RuntimeError(f"TensorRT session fell back to {s.get_providers()}")
            return _session_engine(s)

        add("TensorRT", tensorrt)
    return built


# -- timing --------------------------------------------------------------------------


def timed_us(call: Callable[[], object], rounds: int, cell_s: float) -> np.ndarray:
    """Microseconds per call: 10 unmeasured, then `rounds` calls or `cell_s` seconds."""
    for _ in range(10):
        call()
    times: list[int] = []
    deadline = time.perf_counter() + cell_s
    while len(times) < rounds and (len(times) < 10 or time.perf_counter() < deadline):
        t0 = time.perf_counter_ns()
        call()
        times.append(time.perf_counter_ns() - t0)
    return np.asarray(times) / 1e3


def measure(
    name: str,
    scorers: dict[str, Callable[[np.ndarray], np.ndarray]],
    rounds: int,
    cell_s: float,
) -> list[Row]:
    """Rows/s, p50, p99 per engine and batch, and each engine's gap to the CPU session."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(BATCHES[-1], N_FEATURES)).astype(np.float32)
    reference = scorers["CPU"](x[:1024]) if "CPU" in scorers else None
    rows = []
    for engine, score in scorers.items():
        gap = float(np.max(np.abs(score(x[:1024]) - reference))) if reference is not None else None
        for batch in BATCHES:
            part = np.ascontiguousarray(x[:batch])
            us = timed_us(lambda s=score, p=part: s(p), rounds, cell_s)  # type: ignore[misc]
            p50, p99 = np.percentile(us, [50, 99])
            row = {
                "model": name,
                "engine": engine,
                "batch": batch,
                "calls": len(us),
                "rows_per_s": batch / (p50 / 1e6),
                "p50_us": p50,
                "p99_us": p99,
                "gap": gap,
            }
            rows.append(row)
            _print(row)
    return rows


def _print(row: Row) -> None:
    gap = f"  gap {row['gap']:.1e}" if row["gap"] is not None else ""
    print(
        f"{row['model']:<8} {row['engine']:<20} batch {row['batch']:>5}: "
        f"{row['rows_per_s']:>13,.0f} rows/s  p50 {row['p50_us']:9.1f} us  "
        f"p99 {row['p99_us']:9.1f} us{gap}",
        flush=True,
    )


# -- serving -------------------------------------------------------------------------


def serving_check(models: dict[str, bytes], max_batch: int = 1024) -> list[Row]:
    """What serving builds for each model where a GPU is asked for, and its batcher's gap.

    Per model: `OnnxScorer.from_bytes(prefer_gpu=True)` with CUDA graphs (the serving
    default), so the crossover is measured as at start-up; then the MicroBatcher scores
    one row, `max_batch` rows and 4,096 rows on it, each against the CPU session.
    """
    from inference.batcher import BatcherConfig, MicroBatcher
    from inference.engines import GpuPolicy
    from inference.registry import LoadedModel
    from inference.session import OnnxScorer

    rows = np.random.default_rng(3).normal(size=(4096, N_FEATURES)).astype(np.float32)
    found = []
    for name, model in models.items():
        started = time.perf_counter()
        served = OnnxScorer.from_bytes(
            model, N_FEATURES, prefer_gpu=True, gpu=GpuPolicy(max_batch=max_batch)
        )
        load_s = time.perf_counter() - started
        cpu = OnnxScorer.from_bytes(model, N_FEATURES, prefer_gpu=False, numba_kernels=False)
        batcher = MicroBatcher(
            LoadedModel(name, "1", "champion", "", served, 0), N_FEATURES, BatcherConfig(max_batch)
        )
        gaps = {}
        for n in (1, max_batch, len(rows)):
            got = batcher.score_batch(rows[:n], np.full(n, time.time_ns())).scores
            gaps[str(n)] = float(np.max(np.abs(got - cpu.score(rows[:n]))))
        info = served.engines()
        found.append(
            {
                "model": name,
                "provider": served.provider,
                "load_s": load_s,
                "batcher_gap": gaps,
                **info,
            }
        )
        print(
            f"{name:<8} served on {served.provider}, engines {info['engines']}, "
            f"crossover {info['crossover_batch']} ({info['reason']}); loaded in {load_s:.1f} s; "
            f"batcher vs CPU session max gap by batch {gaps}",
            flush=True,
        )
        if info["costs_us"]:
            print(f"{name:<8} measured at load (us per batch): {info['costs_us']}", flush=True)
    return found


def main() -> None:
    """Print the tables (and write them as JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--cell-s", type=float, default=0.5, help="seconds per engine and batch")
    parser.add_argument("--models", type=Path, help="read <name>.onnx from here if present")
    parser.add_argument("--write-models", type=Path, help="write the models here and stop")
    parser.add_argument("--only", nargs="*", choices=TIMED, help="time these models only")
    parser.add_argument("--serving", action="store_true", help="the serving check only")
    parser.add_argument("--no-tensorrt", action="store_true", help="skip TensorRT")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.write_models:
        args.write_models.mkdir(parents=True, exist_ok=True)
        for name in MODELS:
            (args.write_models / f"{name}.onnx").write_bytes(model_bytes(name))
            print(f"wrote {args.write_models / name}.onnx")
        return
    from inference.session import choose_providers

    available = ort.get_available_providers()
    print(
        f"onnxruntime {ort.__version__}, device {ort.get_device()}, providers {available}, "
        f"{os.cpu_count()} CPUs"
    )
    chosen, reason = choose_providers(prefer_gpu=True)
    providers = ["CPUExecutionProvider"]
    if chosen[0] == "CUDAExecutionProvider":
        providers.append("CUDAExecutionProvider")
        with_trt, trt_reason = choose_providers(prefer_gpu=True, tensorrt=True)
        if args.no_tensorrt:
            print("TensorRT skipped (--no-tensorrt)")
        elif with_trt[0] == "TensorrtExecutionProvider":
            providers.append("TensorrtExecutionProvider")
        else:
            print(f"no TensorRT rows: {trt_reason}")
    else:
        print(f"no usable GPU ({reason}): CPU figures only")
    models = load_models(args.models)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as cache_dir:
        for name in [] if args.serving else args.only or TIMED:
            model = models[name]
            for provider in providers[1:]:
                try:
                    print(f"{name:<8} {provider}: nodes {placement(model, provider, cache_dir)}")
                except Exception as exc:  # noqa: BLE001 -- a finding, not a failure
                    print(f"{name:<8} {provider}: does not load ({exc})".splitlines()[0])
            rows += measure(
                name, engines(name, model, providers, cache_dir), args.rounds, args.cell_s
            )
    serving = serving_check(models)
    if args.json:
        doc = {
            "onnxruntime": ort.__version__,
            "providers": providers,
            "rows": rows,
            "serving": serving,
        }
        args.json.write_text(json.dumps(doc, indent=1, default=str))


if __name__ == "__main__":
    main()
