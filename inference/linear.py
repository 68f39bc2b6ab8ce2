"""LinearKernel: a binary logistic-regression ONNX model scored by a small Numba loop.

Why our own: the arithmetic is a dot product per row, but one ONNX Runtime call costs
far more than that. In the stream worker, between fetches, `session.run` of the
logistic pipeline that `training/` makes cost several times what the same call costs
repeated in a tight loop (docs/architecture.md): its large code path starts cold every
batch. This loop is a few hundred bytes of machine code.

It covers what skl2onnx writes for `make_pipeline(StandardScaler(), LogisticRegression())`
on two classes, or the bare LogisticRegression: an optional `Scaler` feeding one
`LinearClassifier` with two classes, one coefficient row per class and a LOGISTIC post
transform. P(up) is the logistic of the second class's score, summed in the order and
precision ONNX Runtime sums it (float32, see `_score`). For anything else
`compile_linear_kernel` says why and ONNX Runtime keeps scoring, and a model it covers
is used only after it reproduces ONNX Runtime on probe rows (`probe_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit

from inference.trees import Unsupported, node_attributes

MAX_MODEL_BYTES = 256 * 1024  # 12 features take about 1 KB; 256 KB is ~30,000 of them


@dataclass(frozen=True, slots=True)
class LinearKernel:
    """A compiled linear classifier; `score` gives P(up) per row like the ONNX model.

    Attributes:
        offset: (n_features,) float32 subtracted from each input (the Scaler; zeros if none).
        scale: (n_features,) float32 it is then multiplied by (ones if none).
        coef: (n_features,) float32 weights of the up class's score.
        intercept: Its intercept.
        n_features: Input width.
    """

    offset: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    n_features: int

    def score(self, rows: np.ndarray) -> np.ndarray:
        """P(up) for each row of `rows` (n, n_features)."""
        out = np.empty(rows.shape[0], np.float64)
        _score(
            np.ascontiguousarray(rows, np.float32),
            self.offset,
            self.scale,
            self.coef,
            np.float32(self.intercept),
            out,
        )
        return out


# nogil: a loader thread checking a new version must not stall the event loop.
# contract: the sum is fused multiply-adds in float32, feature by feature, then the
# intercept, which is how ONNX Runtime's SGEMM (MLAS) sums these short rows; in float64
# instead, rows of large cancelling terms differed from it by up to 3e-5.
@njit(cache=True, nogil=True, boundscheck=False, fastmath={"contract"})
def _score(
    rows: np.ndarray,
    offset: np.ndarray,
    scale: np.ndarray,
    coef: np.ndarray,
    intercept: np.float32,
    out: np.ndarray,
) -> None:
    for r in range(rows.shape[0]):
        acc = np.float32(0.0)
        for j in range(rows.shape[1]):
            scaled = (rows[r, j] - offset[j]) * scale[j]  # float32, as the Scaler node
            acc = scaled * coef[j] + acc
        logit = np.float64(acc + intercept)
        out[r] = 1.0 / (1.0 + np.exp(-logit))


def warm_up() -> None:
    """Compile (or load from Numba's cache) the kernel now, before the stream starts."""
    one = np.ones(1, np.float32)
    LinearKernel(one - 1, one, one, 0.0, 1).score(np.ones((1, 1), np.float32))


def compile_linear_kernel(model: Any, n_features: int) -> LinearKernel:
    """The kernel of an ONNX `model` (onnx.ModelProto): [Scaler ->] LinearClassifier.

    Raises:
        Unsupported: With the reason the kernel does not cover this model.
    """
    graph = model.graph
    ops = [n.op_type for n in graph.node]
    if ops not in (["LinearClassifier"], ["Scaler", "LinearClassifier"]):
        raise Unsupported(f"graph is {ops}, not [Scaler ->] LinearClassifier")
    if len(graph.input) != 1 or graph.node[0].input[0] != graph.input[0].name:
        raise Unsupported("the first node does not read the graph's one input")
    offset = np.zeros(n_features, np.float32)
    scale = np.ones(n_features, np.float32)
    if ops[0] == "Scaler":
        scaler, classifier = graph.node
        if classifier.input[0] != scaler.output[0]:
            raise Unsupported("the LinearClassifier does not read the Scaler's output")
        attrs = node_attributes(scaler)
        offset = _per_feature(attrs.get("offset", [0.0]), n_features, "offset")
        scale = _per_feature(attrs.get("scale", [1.0]), n_features, "scale")
    else:
        classifier = graph.node[0]
    attrs = node_attributes(classifier)
    labels = attrs.get("classlabels_ints") or attrs.get("classlabels_strings") or []
    if len(labels) != 2:
        raise Unsupported(f"{len(labels)} class labels, not a binary classifier")
    post = attrs.get("post_transform", "NONE")
    if post != "LOGISTIC" or attrs.get("multi_class", 0) != 0:
        raise Unsupported(f"post_transform {post} is not covered (only LOGISTIC)")
    coefficients = np.asarray(attrs["coefficients"], np.float32)
    intercepts = np.asarray(attrs.get("intercepts", [0.0, 0.0]), np.float32)
    if coefficients.size != 2 * n_features or intercepts.size != 2:
        raise Unsupported(f"{coefficients.size} coefficients for 2 classes x {n_features}")
    up = coefficients.reshape(2, n_features)[1]
    return LinearKernel(offset, scale, np.ascontiguousarray(up), float(intercepts[1]), n_features)


def compile_from_bytes(model: bytes, n_features: int) -> LinearKernel:
    """`compile_linear_kernel` on a serialized ONNX model.

    A model past MAX_MODEL_BYTES is refused unparsed: this runs on the model loader's
    thread while the stream is served, and parsing a large tree ensemble's protobuf
    holds the GIL for milliseconds (the tree kernel compiles those in a child process).

    Raises:
        Unsupported: With the reason the kernel does not cover this model.
    """
    if len(model) > MAX_MODEL_BYTES:
        raise Unsupported(f"{len(model)} bytes: larger than any linear model it covers")
    import onnx

    return compile_linear_kernel(onnx.load_from_string(model), n_features)


def probe_rows(kernel: LinearKernel, n_rows: int = 1024, seed: int = 0) -> np.ndarray:
    """Rows spread over the scaled input space: typical, far out, exact zeros, and NaN."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=3.0, size=(n_rows, kernel.n_features))
    z[: n_rows // 8] *= 100.0  # far out: the logistic saturates
    with np.errstate(divide="ignore"):
        spread = np.where(kernel.scale != 0, 1.0 / kernel.scale, 1.0)
    rows = (kernel.offset + z * spread).astype(np.float32)
    rows[-1] = 0.0
    rows[rng.random(rows.shape) < 0.02] = np.nan
    return rows


def _per_feature(values: list[float], n_features: int, name: str) -> np.ndarray:
    if len(values) == 1:
        return np.full(n_features, values[0], np.float32)
    if len(values) != n_features:
        raise Unsupported(f"Scaler {name} has {len(values)} values for {n_features} features")
    return np.asarray(values, np.float32)
