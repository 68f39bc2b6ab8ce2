"""ONNX Runtime sessions with deliberate options and an execution provider chosen once."""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from functools import cache

import numpy as np
import onnxruntime as ort
from prometheus_client import Gauge

from tickserve.errors import ModelRejected

logger = logging.getLogger(__name__)

# Libraries the CUDA provider of onnxruntime-gpu 1.2x/1.3x loads; if one is missing,
# asking for CUDA prints an error and falls back, so we check first and stay quiet.
_CUDA_LIBS = ("libcudart.so.13", "libcublasLt.so.13", "libcudnn.so.9")

PROVIDER = Gauge(
    "onnx_execution_provider_info",
    "1 for the execution provider ONNX sessions ask for, with the reason it was chosen",
    ["provider", "reason"],
)


@cache
def choose_providers(prefer_gpu: bool = True) -> tuple[tuple[str, ...], str]:
    """Execution providers to ask for, and why; decided once per process.

    Returns:
        (providers, reason), e.g. ``(("CPUExecutionProvider",), "no CUDA libraries")``.
    """
    providers, reason = _decide(prefer_gpu)
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


@dataclass(frozen=True, slots=True)
class OnnxScorer:
    """A loaded ONNX classifier; `score` returns P(up) per row as float64."""

    session: ort.InferenceSession
    input_name: str
    prob_output: str
    provider: str

    @classmethod
    def from_bytes(
        cls, model: bytes, n_features: int, prefer_gpu: bool = True, threads: int = 1
    ) -> OnnxScorer:
        """Build a session and check the model's interface against `n_features`.

        `threads` is ONNX Runtime's intra-op pool; 1 by default (see below).
        """
        providers, reason = choose_providers(prefer_gpu)
        options = ort.SessionOptions()
        # Two cores, one worker: one intra-op thread keeps the event loop's core free
        # and avoids thread hand-offs that cost more than these small batches. Big tree
        # ensembles at batch 1000 gain from more (TICKSERVE_ONNX_THREADS) on larger machines.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # the arena keeps output buffers between calls of varying batch size
        options.enable_cpu_mem_arena = True
        try:
            session = ort.InferenceSession(model, sess_options=options, providers=list(providers))
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
        logger.info("onnx session ready", extra={"provider": provider, "reason": reason})
        return cls(session, inputs[0].name, prob[0], provider)

    def score(self, rows: np.ndarray) -> np.ndarray:
        """P(up) for each row of `rows` (n, n_features)."""
        feed = {self.input_name: np.ascontiguousarray(rows, np.float32)}
        probs = self.session.run([self.prob_output], feed)[0]
        return np.asarray(probs[:, 1], np.float64)
