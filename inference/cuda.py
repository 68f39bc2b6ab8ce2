"""The GPU engine's parts: pinned host buffers and one captured CUDA graph per batch-size bucket.

Only used where `inference.session.choose_providers` found a usable CUDA provider; on
any other machine nothing here runs (the project never needs a GPU).

- Pinned host memory: a host-to-device copy from pageable memory goes through a
  driver bounce buffer in chunks; from page-locked memory it is one DMA transfer. The
  staging array the batch is copied into is registered with the CUDA runtime
  (``cudaHostRegister``) once, for the session's life.
- CUDA graphs (ONNX Runtime's ``enable_cuda_graph``): the first run of a session
  records its kernel launches into a graph, later runs replay the graph with one
  launch. A graph holds fixed shapes and fixed device addresses, so each batch-size
  bucket (powers of two) has its own session, input and output tensors bound once;
  a batch is padded up to its bucket (rows are independent: padding changes no score).
  ONNX Runtime captures only a graph whose every node runs on CUDA: the model must
  hold standard operators only (`training.compile_trees`, `training.standard_ops`).
"""

from __future__ import annotations

import ctypes
import logging
import weakref
from typing import Any

import numpy as np
import onnxruntime as ort

logger = logging.getLogger(__name__)

CUDA_RUNTIME = "libcudart.so.13"  # the runtime onnxruntime-gpu 1.2x/1.3x links
_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(double)": np.float64}


def cuda_provider(cuda_graph: bool = False, device_id: int = 0) -> tuple[str, dict[str, str]]:
    """The CUDA provider with its options.

    TF32 is off: matrix products on TF32 keep 10 mantissa bits, which moves an MLP's
    P(up) by about 1e-3, far outside the 1e-5 the golden rows allow.
    """
    options = {"device_id": str(device_id), "use_tf32": "0"}
    if cuda_graph:
        options["enable_cuda_graph"] = "1"
    return "CUDAExecutionProvider", options


def pinned_zeros(shape: tuple[int, ...], dtype: Any = np.float32) -> tuple[np.ndarray, bool]:
    """A zeroed array in page-locked host memory, and whether pinning worked.

    Where the CUDA runtime does not load or refuses, the array is ordinary (pageable)
    memory: copies from it are slower, never wrong.
    """
    array = np.zeros(shape, dtype)
    try:
        runtime = ctypes.CDLL(CUDA_RUNTIME)
    except OSError:
        return array, False
    pointer = ctypes.c_void_p(array.ctypes.data)
    status = runtime.cudaHostRegister(pointer, ctypes.c_size_t(array.nbytes), ctypes.c_uint(0))
    if status != 0:
        logger.info("host buffer not pinned", extra={"cuda_status": status})
        return array, False
    weakref.finalize(array, runtime.cudaHostUnregister, pointer)
    return array, True


def _session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    return options


class GraphedBucket:
    """One session whose CUDA graph scores exactly `size` rows, its tensors bound once."""

    def __init__(self, model: bytes, n_features: int, size: int, device_id: int = 0) -> None:
        """Open the session, bind its input and every output on the device, capture the graph.

        Raises:
            RuntimeError: The session does not run on CUDA (no usable provider).
        """
        self.size = size
        self.session = ort.InferenceSession(
            model, sess_options=_session_options(), providers=[cuda_provider(True, device_id)]
        )
        if self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise RuntimeError(f"CUDA graph session fell back to {self.session.get_providers()}")
        self._binding = self.session.io_binding()
        meta = self.session.get_inputs()[0]
        self._input = ort.OrtValue.ortvalue_from_shape_and_type(
            (size, n_features), np.float32, "cuda", device_id
        )
        self._binding.bind_ortvalue_input(meta.name, self._input)
        self._outputs: dict[str, ort.OrtValue] = {}
        for out in self.session.get_outputs():
            # every output bound: a graph may only write where it wrote when captured
            shape = tuple(d if isinstance(d, int) else size for d in out.shape)
            value = ort.OrtValue.ortvalue_from_shape_and_type(
                shape, _DTYPES[out.type], "cuda", device_id
            )
            self._binding.bind_ortvalue_output(out.name, value)
            self._outputs[out.name] = value
        self._prob = next(v for name, v in self._outputs.items() if "prob" in name)
        self.staging, self.pinned = pinned_zeros((size, n_features))
        self._input.update_inplace(self.staging)
        for _ in range(2):  # the first run captures the graph, the second replays it
            self.session.run_with_iobinding(self._binding)

    def run(self, rows: np.ndarray) -> np.ndarray:
        """P(up) for the first `len(rows)` rows (at most `size`), the rest padded with zeros."""
        n = rows.shape[0]
        self.staging[:n] = rows
        self.staging[n:] = 0.0
        self._input.update_inplace(self.staging)
        self.session.run_with_iobinding(self._binding)
        return np.asarray(self._prob.numpy()[:n, 1], np.float64)


class CudaGraphEngine:
    """Scores a batch through the captured graph of the power-of-two bucket that holds it.

    Batches above the largest bucket are scored in chunks of it.
    """

    name = "cuda-graphs"

    def __init__(self, model: bytes, n_features: int, max_batch: int, device_id: int = 0) -> None:
        """Capture one graph per power of two up to the first >= `max_batch` (1, 2, 4, ...)."""
        self._graphs: dict[int, GraphedBucket] = {}
        size = 1
        while True:
            self._graphs[size] = GraphedBucket(model, n_features, size, device_id)
            if size >= max_batch:
                break
            size *= 2
        self.largest = size
        self.pinned = all(g.pinned for g in self._graphs.values())

    def score(self, rows: np.ndarray) -> np.ndarray:
        """P(up) for each row of `rows`."""
        n = rows.shape[0]
        if n > self.largest:
            step = self.largest
            return np.concatenate([self.score(rows[i : i + step]) for i in range(0, n, step)])
        return self._graphs[1 << max(n - 1, 0).bit_length()].run(rows)
