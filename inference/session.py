"""ONNX Runtime sessions with deliberate options and an execution provider chosen once."""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache, partial
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort
from prometheus_client import Gauge

from inference.cuda import CudaGraphEngine, cuda_provider, pinned_zeros
from inference.engines import Engine, EngineRouter, FunctionEngine, GpuPolicy, build_router
from inference.linear import LinearKernel
from inference.linear import compile_from_bytes as compile_linear
from inference.linear import probe_rows as linear_probe_rows
from inference.trees import (
    PROBE_TOLERANCE,
    TreeKernel,
    Unsupported,
    compile_from_bytes,
    probe_rows,
)
from tickserve.errors import ModelRejected

logger = logging.getLogger(__name__)
_Kernel = TypeVar("_Kernel", TreeKernel, LinearKernel)

# Libraries the CUDA provider of onnxruntime-gpu 1.2x/1.3x loads; if one is missing,
# asking for CUDA prints an error and falls back, so we check first and stay quiet.
_CUDA_LIBS = ("libcudart.so.13", "libcublasLt.so.13", "libcudnn.so.9")
_TENSORRT_LIB = "libnvinfer.so.10"

PROVIDER = Gauge(
    "onnx_execution_provider_info",
    "1 for the execution provider ONNX sessions ask for, with the reason it was chosen",
    ["provider", "reason"],
)


@cache
def choose_providers(
    prefer_gpu: bool = True, tensorrt: bool = False
) -> tuple[tuple[str, ...], str]:
    """Execution providers to ask for, and why; decided once per process.

    `tensorrt` puts TensorRT before CUDA when its library loads too (configured, never
    by default: TensorRT builds an engine per input shape, which takes seconds).

    Returns:
        (providers, reason), e.g. ``(("CPUExecutionProvider",), "no CUDA libraries")``.
    """
    providers, reason = _decide(prefer_gpu)
    if tensorrt and providers[0] == "CUDAExecutionProvider":
        providers, reason = _with_tensorrt(providers, reason)
    PROVIDER.labels(providers[0], reason).set(1)
    logger.info("execution provider chosen", extra={"provider": providers[0], "reason": reason})
    return providers, reason


def _decide(prefer_gpu: bool) -> tuple[tuple[str, ...], str]:
    available = ort.get_available_providers()
    if not prefer_gpu:
        return ("CPUExecutionProvider",), "GPU disabled by config"
    if "CUDAExecutionProvider" not in available:
        return ("CPUExecutionProvider",), "onnxruntime build has no CUDA provider"
    for lib in _CUDA_LIBS:
        try:
            ctypes.CDLL(lib)
        except OSError:
            return ("CPUExecutionProvider",), f"CUDA provider present but {lib} is not loadable"
    return ("CUDAExecutionProvider", "CPUExecutionProvider"), "CUDA libraries loadable"


def _with_tensorrt(providers: tuple[str, ...], reason: str) -> tuple[tuple[str, ...], str]:
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        return providers, f"{reason}; TensorRT asked for but not in this onnxruntime build"
    try:
        ctypes.CDLL(_TENSORRT_LIB)
    except OSError:
        return providers, f"{reason}; TensorRT asked for but {_TENSORRT_LIB} is not loadable"
    return ("TensorrtExecutionProvider", *providers), "TensorRT configured and loadable"


class DeviceBinding:
    """I/O binding for a session on a GPU: device tensors allocated once, reused every batch.

    Without it, every `session.run` on CUDA allocates the input and output on the device
    and frees them again. Here each batch is padded up to a power-of-two bucket (the
    rows are independent, so padding changes no score), whose input and output tensors
    live on the device for the session's life: a batch costs one host-to-device copy of
    its rows (from a pinned host buffer, `inference.cuda.pinned_zeros`), the run, and
    one device-to-host copy of the probabilities.
    """

    name = "cuda-io-binding"

    def __init__(
        self,
        session: ort.InferenceSession,
        input_name: str,
        prob_output: str,
        device: str,
        n_features: int,
    ) -> None:
        """Bind `session`'s input and probabilities output to tensors on `device`."""
        self.session = session
        self.input_name = input_name
        self.prob_output = prob_output
        self.device = device
        self.n_features = n_features
        self._binding = session.io_binding()
        self._buckets: dict[int, tuple[ort.OrtValue, ort.OrtValue, np.ndarray]] = {}
        self._bound = 0

    def score(self, rows: np.ndarray) -> np.ndarray:
        """`run`: the engine interface (`inference.engines.Engine`)."""
        return self.run(rows)

    def run(self, rows: np.ndarray) -> np.ndarray:
        """P(up) for `rows` (n, n_features) float32, through the bound device tensors."""
        n = rows.shape[0]
        size = 1 << max(n - 1, 0).bit_length()  # the power of two >= n
        bucket = self._buckets.get(size)
        if bucket is None:
            bucket = self._allocate(size)
        x, y, staging = bucket
        staging[:n] = rows
        staging[n:] = 0.0
        x.update_inplace(staging)
        if self._bound != size:
            self._binding.bind_ortvalue_input(self.input_name, x)
            self._binding.bind_ortvalue_output(self.prob_output, y)
            self._bound = size
        self.session.run_with_iobinding(self._binding)
        return np.asarray(y.numpy()[:n, 1], np.float64)

    def _allocate(self, size: int) -> tuple[ort.OrtValue, ort.OrtValue, np.ndarray]:
        def tensor(shape: tuple[int, int]) -> ort.OrtValue:
            return ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, self.device, 0)

        bucket = (
            tensor((size, self.n_features)),
            tensor((size, 2)),
            pinned_zeros((size, self.n_features))[0],
        )
        self._buckets[size] = bucket
        return bucket


@dataclass(frozen=True, slots=True)
class OnnxScorer:
    """A loaded ONNX classifier; `score` returns P(up) per row as float64.

    Attributes:
        session: The ONNX Runtime session (always built: it defines the model's contract).
        input_name: The one input tensor.
        prob_output: The probabilities output.
        provider: The execution provider the session runs on.
        trees: Set when a tree ensemble is scored by `inference.trees` instead of the
            session, after it reproduced the session on probe rows.
        binding: Set when the session runs on a GPU: device tensors reused per batch.
        linear: Set when a logistic regression is scored by `inference.linear`
            instead of the session, after it reproduced the session on probe rows.
        router: Set where the session runs on a GPU: each batch goes to the CPU
            engine (a kernel or a CPU session) or the GPU engine by its size
            (`inference.engines`).
        gpu_reason: Why the GPU serves or not (the provider choice, else the router's).
    """

    session: ort.InferenceSession
    input_name: str
    prob_output: str
    provider: str
    trees: TreeKernel | None = None
    binding: DeviceBinding | None = None
    linear: LinearKernel | None = None
    router: EngineRouter | None = None
    gpu_reason: str = ""

    @property
    def engine(self) -> str:
        """What scores the rows on the CPU: "tree-kernel", "linear-kernel" or "onnxruntime"."""
        if self.trees is not None:
            return "tree-kernel"
        return "linear-kernel" if self.linear is not None else "onnxruntime"

    def engines(self) -> dict[str, Any]:
        """The engines, the crossover batch size and why (what GET /model shows)."""
        if self.router is not None:
            return self.router.describe()
        return {
            "engines": {"cpu": self.engine, "gpu": None},
            "crossover_batch": None,
            "reason": self.gpu_reason,
            "costs_us": None,
        }

    @classmethod
    def from_bytes(
        cls,
        model: bytes,
        n_features: int,
        prefer_gpu: bool = True,
        threads: int = 1,
        numba_kernels: bool | Callable[[bytes, int], TreeKernel] = True,
        tensorrt: bool = False,
        gpu: GpuPolicy | None = None,
    ) -> OnnxScorer:
        """Build a session and check the model's interface against `n_features`.

        `threads` is ONNX Runtime's intra-op pool; 1 by default (see below). With
        `numba_kernels`, a tree ensemble the tree kernel covers is scored by it (see
        `inference.trees`), and a logistic regression by `inference.linear`; anything
        else, or a kernel that disagrees with the session on the probe rows, is scored
        by the session. `numba_kernels` may also be the function that compiles the tree
        kernel (e.g. a `KernelCompiler`).

        Where the session runs on a GPU, `score` routes each batch by its size between
        the CPU engine (the kernel, else a CPU session) and the GPU engine (CUDA graphs
        per `gpu`, else the I/O binding), at the crossover measured here
        (`inference.engines.build_router`).
        """
        providers, reason = choose_providers(prefer_gpu, tensorrt)
        options = ort.SessionOptions()
        # One intra-op thread keeps the event loop's core free and avoids thread
        # hand-offs that cost more than these small batches. Big tree
        # ensembles at batch 1000 gain from more (TICKSERVE_ONNX_THREADS) on larger machines.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # the arena keeps output buffers between calls of varying batch size
        options.enable_cpu_mem_arena = True
        asked: list[Any] = [
            cuda_provider() if p == "CUDAExecutionProvider" else p for p in providers
        ]
        try:
            session = ort.InferenceSession(model, sess_options=options, providers=asked)
        except Exception as exc:  # onnxruntime raises several unrelated types
            raise ModelRejected(f"ONNX model does not load: {exc}", reason="load") from exc
        inputs = session.get_inputs()
        if len(inputs) != 1 or inputs[0].shape[-1] not in (n_features, None, "N"):
            shapes = [(i.name, i.shape) for i in inputs]
            raise ModelRejected(
                f"model inputs {shapes} do not take {n_features} features", reason="contract"
            )
        prob = [o.name for o in session.get_outputs() if "prob" in o.name]
        if not prob:
            names = [o.name for o in session.get_outputs()]
            raise ModelRejected(
                f"model has no probabilities output (outputs: {names})", reason="contract"
            )
        provider = session.get_providers()[0]
        binding = None
        if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
            binding = DeviceBinding(session, inputs[0].name, prob[0], "cuda", n_features)
        scorer = cls(session, inputs[0].name, prob[0], provider, None, binding, gpu_reason=reason)
        if numba_kernels:
            compile_kernel = compile_from_bytes if numba_kernels is True else numba_kernels
            scorer = scorer._with_tree_kernel(model, n_features, compile_kernel)
            if scorer.trees is None:
                scorer = scorer._with_linear_kernel(model, n_features)
        if binding is not None:
            scorer = scorer._with_router(model, n_features, options, gpu or GpuPolicy())
        logger.info(
            "onnx session ready",
            extra={"provider": provider, "reason": reason, "engine": scorer.engine},
        )
        return scorer

    def score(self, rows: np.ndarray) -> np.ndarray:
        """P(up) for each row of `rows` (n, n_features)."""
        if self.router is not None:
            return self.router.score(rows)
        return self.score_on_cpu(rows)

    def score_on_cpu(self, rows: np.ndarray) -> np.ndarray:
        """P(up) from the kernel, else the session (on a GPU where the session runs there)."""
        if self.trees is not None:
            return self.trees.score(rows)
        if self.linear is not None:
            return self.linear.score(rows)
        return self.run_session(rows)

    def run_session(self, rows: np.ndarray) -> np.ndarray:
        """P(up) from the ONNX Runtime session, whatever `engine` is."""
        if self.binding is not None:
            return self.binding.run(rows)
        feed = {self.input_name: np.ascontiguousarray(rows, np.float32)}
        probs = self.session.run([self.prob_output], feed)[0]
        return np.asarray(probs[:, 1], np.float64)

    def _with_router(
        self, model: bytes, n_features: int, options: ort.SessionOptions, policy: GpuPolicy
    ) -> OnnxScorer:
        """This scorer with a router between a CPU engine and the GPU engine it measured."""
        cpu: Engine
        if self.trees is not None:
            cpu = FunctionEngine(self.engine, self.trees.score)
        elif self.linear is not None:
            cpu = FunctionEngine(self.engine, self.linear.score)
        else:
            on_cpu = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            cpu = FunctionEngine("onnxruntime-cpu", _session_scores(on_cpu, self.prob_output))
        make_gpu: Callable[[], Engine] | None = None
        why_not = ""
        ml_ops = _ml_operators(model)
        if ml_ops:
            why_not = f"graph has ai.onnx.ml operators {ml_ops}: no CUDA kernels for them"
        elif self.provider == "CUDAExecutionProvider" and policy.cuda_graphs:
            make_gpu = partial(CudaGraphEngine, model, n_features, policy.max_batch)
        elif self.binding is not None:
            make_gpu = partial(_built, self.binding)
        router = build_router(cpu, make_gpu, n_features, policy, why_not)
        return replace(self, router=router, gpu_reason=router.reason)

    def _with_tree_kernel(
        self,
        model: bytes,
        n_features: int,
        compile_kernel: Callable[[bytes, int], TreeKernel] = compile_from_bytes,
    ) -> OnnxScorer:
        """This scorer with the tree kernel, if it covers the model and agrees with ORT."""
        kernel = self._checked(compile_kernel, probe_rows, "tree kernel", model, n_features)
        return self if kernel is None else replace(self, trees=kernel)

    def _with_linear_kernel(self, model: bytes, n_features: int) -> OnnxScorer:
        """This scorer with the linear kernel, if it covers the model and agrees with ORT."""
        kernel = self._checked(
            compile_linear, linear_probe_rows, "linear kernel", model, n_features
        )
        return self if kernel is None else replace(self, linear=kernel)

    def _checked(
        self,
        compile_kernel: Callable[[bytes, int], _Kernel],
        probe_rows_of: Callable[[_Kernel], np.ndarray],
        name: str,
        model: bytes,
        n_features: int,
    ) -> _Kernel | None:
        """The kernel compiled for `model`, or None if it does not cover it or disagrees."""
        try:
            kernel = compile_kernel(model, n_features)
        except Unsupported as exc:
            logger.debug(f"{name} not used", extra={"reason": str(exc)})
            return None
        probe = probe_rows_of(kernel)
        return kernel if self._agrees(kernel.score(probe), probe, name) else None

    def _agrees(self, scores: np.ndarray, probe: np.ndarray, kernel: str) -> bool:
        """True if `scores` match the session's on `probe` (NaN where it gives NaN)."""
        reference = self.run_session(probe)
        both_nan = np.isnan(scores) & np.isnan(reference)
        gap = float(np.max(np.abs(np.where(both_nan, 0.0, scores - reference))))
        if not gap <= PROBE_TOLERANCE:  # NaN-safe: a NaN on one side only keeps the session
            logger.warning(
                "kernel disagrees with onnxruntime on probe rows; onnxruntime scores",
                extra={"kernel": kernel, "gap": gap, "tolerance": PROBE_TOLERANCE},
            )
            return False
        return True


def _session_scores(
    session: ort.InferenceSession, prob_output: str
) -> Callable[[np.ndarray], np.ndarray]:
    name = session.get_inputs()[0].name

    def scores(rows: np.ndarray) -> np.ndarray:
        feed = {name: np.ascontiguousarray(rows, np.float32)}
        return np.asarray(session.run([prob_output], feed)[0][:, 1], np.float64)

    return scores


def _ml_operators(model: bytes) -> list[str]:
    """The `ai.onnx.ml` operators of a model: ONNX Runtime runs them on the CPU only."""
    import onnx

    graph = onnx.load_from_string(model).graph
    return sorted({n.op_type for n in graph.node if n.domain == "ai.onnx.ml"})


def _built(engine: Engine) -> Engine:
    return engine
