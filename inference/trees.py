"""TreeKernel: an ONNX tree ensemble scored by a vectorised Numba kernel (QuickScorer bitvectors).

Why our own: ONNX Runtime walks each tree node by node with a data-dependent branch per
level, so the cost of a 200-tree gradient-boosted model grows with every tree and row
and its branches mispredict on every split. Trading models
are very often such ensembles, and the batcher hands over 1,000-row batches, which suits
a different evaluation order (Lucchese et al., "QuickScorer", SIGIR 2015):

- every tree's leaves are numbered left to right, and the tree keeps a bitvector of the
  leaves still reachable, starting with all of them;
- each split whose test fails (the row goes right) clears the leaves of its left
  subtree; the exit leaf is then the lowest bit still set.

The tests are independent of one another, so the kernel runs them as straight-line,
branch-free loops over a column of the batch, which the compiler vectorises
(`bench.batcher_bench` compares it with ONNX Runtime; docs/architecture.md has figures).

Only data comes from the model: the kernel reads the ONNX node's attributes (never
pickles, never generated code). It covers the form skl2onnx gives a binary
HistGradientBoostingClassifier (one `TreeEnsembleClassifier` node, one score per row,
LOGISTIC post transform, `BRANCH_LEQ`/`BRANCH_LT` splits, at most 64 leaves per tree), and
the tensor form `training.compile_trees` gives the same model (`inference.gemm_kernel`). For
anything else `compile_tree_kernel` says why and ONNX Runtime keeps scoring. And even a
model it covers is used only after it reproduces ONNX Runtime on probe rows built from
the model's own thresholds (at, just below and just above each split, and NaN).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Any

import numpy as np
from numba import njit

logger = logging.getLogger(__name__)

MAX_LEAVES = 64  # one uint64 bitvector per tree and row
PROBE_TOLERANCE = 1e-6  # largest P(up) gap to ONNX Runtime on the probe rows

_DEBRUIJN = 0x03F7_9D71_B4CB_0A89
# lowest set bit -> its index: isolate it, multiply by a de Bruijn constant, look up the top 6 bits
_BIT_INDEX = np.zeros(64, np.int64)
for _i in range(64):
    _BIT_INDEX[(((1 << _i) * _DEBRUIJN) & 0xFFFF_FFFF_FFFF_FFFF) >> 58] = _i


class Unsupported(ValueError):  # noqa: N818 -- a reason to fall back, not a failure
    """The model is not one the kernel covers; ONNX Runtime scores it."""


@dataclass(frozen=True, slots=True)
class TreeKernel:
    """Arrays of one compiled ensemble; `score` gives P(up) per row like the ONNX model.

    Attributes:
        features: (n_splits,) feature index each split tests.
        thresholds: (n_splits,) float32 split values.
        masks: (n_splits,) bits to keep when the test fails (the left subtree cleared).
        nan_true: (n_splits,) a NaN input takes the test's true branch.
        strict: (n_splits,) the test is ``x < t`` (BRANCH_LT) rather than ``x <= t``.
        split_start: (n_trees + 1,) where each tree's splits begin in the arrays above.
        leaf_values: (n_leaves,) float64 weight of each leaf, trees one after another.
        leaf_start: (n_trees + 1,) where each tree's leaves begin.
        base: Score every row starts from; P(up) is the logistic of the summed score.
        n_features: Input width.
    """

    features: np.ndarray
    thresholds: np.ndarray
    masks: np.ndarray
    nan_true: np.ndarray
    strict: np.ndarray
    split_start: np.ndarray
    leaf_values: np.ndarray
    leaf_start: np.ndarray
    base: float
    n_features: int

    @property
    def n_trees(self) -> int:
        """Trees in the ensemble."""
        return int(self.split_start.shape[0] - 1)

    def score(self, rows: np.ndarray) -> np.ndarray:
        """P(up) for each row of `rows` (n, n_features) float32."""
        columns = np.ascontiguousarray(rows.T, np.float32)  # one split reads one column
        out = np.empty(rows.shape[0], np.float64)
        _score(
            columns,
            self.features,
            self.thresholds,
            self.masks,
            self.nan_true,
            self.strict,
            self.split_start,
            self.leaf_values,
            self.leaf_start,
            self.base,
            _BIT_INDEX,
            out,
        )
        return out


# nogil: a loader thread checking a new version must not stall the event loop
@njit(cache=True, nogil=True, boundscheck=False)
def _score(
    columns: np.ndarray,
    features: np.ndarray,
    thresholds: np.ndarray,
    masks: np.ndarray,
    nan_true: np.ndarray,
    strict: np.ndarray,
    split_start: np.ndarray,
    leaf_values: np.ndarray,
    leaf_start: np.ndarray,
    base: float,
    bit_index: np.ndarray,
    out: np.ndarray,
) -> None:
    n = columns.shape[1]
    acc = np.full(n, base)
    alive = np.empty(n, np.uint64)
    for tree in range(split_start.shape[0] - 1):
        alive[:] = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
        for k in range(split_start[tree], split_start[tree + 1]):
            column = columns[features[k]]
            t = thresholds[k]
            mask = masks[k]
            take_nan = nan_true[k]
            if strict[k]:
                for r in range(n):
                    x = column[r]
                    passed = (x < t) | (take_nan & (x != x))
                    alive[r] &= mask | (np.uint64(0) - np.uint64(passed))
            else:
                for r in range(n):
                    x = column[r]
                    passed = (x <= t) | (take_nan & (x != x))
                    alive[r] &= mask | (np.uint64(0) - np.uint64(passed))
        first = leaf_start[tree]
        for r in range(n):
            bits = alive[r]
            lowest = bits & (~bits + np.uint64(1))
            leaf = bit_index[(lowest * np.uint64(_DEBRUIJN)) >> np.uint64(58)]
            acc[r] += leaf_values[first + leaf]
    for r in range(n):
        out[r] = 1.0 / (1.0 + np.exp(-acc[r]))


def warm_up() -> None:
    """Compile (or load from Numba's cache) the kernel now, before the stream starts.

    Otherwise the first tree model swapped in would compile it in the loader thread,
    and compilation is Python code that competes with the event loop for the GIL.
    """
    stump = TreeKernel(
        np.zeros(1, np.int64),
        np.zeros(1, np.float32),
        np.array([~np.uint64(1)], np.uint64),
        np.zeros(1, np.bool_),
        np.zeros(1, np.bool_),
        np.array([0, 1], np.int64),
        np.array([-1.0, 1.0]),
        np.array([0, 2], np.int64),
        0.0,
        1,
    )
    stump.score(np.array([[-1.0], [1.0]], np.float32))


def compile_tree_kernel(model: Any, n_features: int) -> TreeKernel:
    """Compile the single TreeEnsembleClassifier of an ONNX `model` (onnx.ModelProto).

    Raises:
        Unsupported: With the reason the kernel does not cover this model.
    """
    graph = model.graph
    from inference.gemm_kernel import GRAPH_NAME, compile_gemm_graph  # it imports this module

    if graph.name == GRAPH_NAME:  # an ensemble compiled to tensor operators
        return compile_gemm_graph(model, n_features)
    if len(graph.node) != 1 or graph.node[0].op_type != "TreeEnsembleClassifier":
        ops = [n.op_type for n in graph.node]
        raise Unsupported(f"graph is {ops}, not one TreeEnsembleClassifier")
    attrs = node_attributes(graph.node[0])
    labels = attrs.get("classlabels_int64s") or attrs.get("classlabels_strings") or []
    if len(labels) != 2 or set(attrs["class_ids"]) != {0}:
        raise Unsupported("not a binary classifier with one score per row")
    post = attrs.get("post_transform", "NONE")
    if post != "LOGISTIC":
        raise Unsupported(f"post_transform {post} is not covered (only LOGISTIC)")
    base_values = attrs.get("base_values") or [0.0]
    if len(base_values) != 1:
        raise Unsupported(f"{len(base_values)} base values for one score")
    nodes = _Nodes(attrs)
    if nodes.features.size and int(nodes.features.max()) >= n_features:
        raise Unsupported("a split reads a feature past the input width")
    return nodes.compile(float(base_values[0]), n_features)


def compile_from_bytes(model: bytes, n_features: int) -> TreeKernel:
    """`compile_tree_kernel` on a serialized ONNX model.

    Raises:
        Unsupported: With the reason the kernel does not cover this model.
    """
    import onnx

    return compile_tree_kernel(onnx.load_from_string(model), n_features)


class KernelCompiler:
    """Runs `compile_from_bytes` in a child process, for models swapped in while serving.

    Parsing a 200-tree ONNX model and turning its attributes into arrays holds the GIL
    for milliseconds at a stretch (protobuf parsing in C, long list conversions), which
    the event loop would feel as a stall. The child (started on first use, then kept)
    reads the ONNX bytes on stdin and answers with the kernel's arrays as an ``.npz``
    (no pickle), so the serving process only copies a few arrays.
    """

    def __init__(self) -> None:
        """No process yet."""
        self._child: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def __call__(self, model: bytes, n_features: int) -> TreeKernel:
        """The compiled kernel, or the child's `Unsupported`."""
        with self._lock:
            if self._child is None or self._child.poll() is not None:
                root = Path(__file__).resolve().parents[1]
                self._child = subprocess.Popen(
                    [sys.executable, "-c", "from inference.trees import _serve; _serve()"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    cwd=root,
                )
            child = self._child
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write(struct.pack("<QQ", len(model), n_features) + model)
            child.stdin.flush()
            status, size = struct.unpack("<QQ", _read_exactly(child.stdout, 16))
            payload = _read_exactly(child.stdout, size)
        if status:
            raise Unsupported(payload.decode())
        return _from_npz(payload)

    def start(self) -> None:
        """Start the child and wait until it answers, so the first swap pays no start-up."""
        with contextlib.suppress(Unsupported):  # an empty model: the child's reply to a ping
            self(b"", 0)

    def close(self) -> None:
        """Stop the child process, if one was started."""
        with self._lock:
            child, self._child = self._child, None
        if child is not None and child.stdin is not None:
            child.stdin.close()  # the child exits at end of input
            child.wait(timeout=10)
            if child.stdout is not None:
                child.stdout.close()


def _serve() -> None:
    """The child's loop: ONNX bytes in, kernel arrays (or a reason) out."""
    with contextlib.suppress(OSError, AttributeError):
        os.nice(10)  # below the serving process's event loop
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while header := stdin.read(16):
        size, n_features = struct.unpack("<QQ", header)
        try:
            status, payload = 0, _to_npz(compile_from_bytes(_read_exactly(stdin, size), n_features))
        except Unsupported as exc:
            status, payload = 1, str(exc).encode()
        stdout.write(struct.pack("<QQ", status, len(payload)) + payload)
        stdout.flush()


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)
    if data is None or len(data) != size:
        raise OSError(f"kernel compiler: expected {size} bytes, got {len(data or b'')}")
    return data


def _to_npz(kernel: TreeKernel) -> bytes:
    buffer = io.BytesIO()
    arrays: dict[str, Any] = {f.name: np.asarray(getattr(kernel, f.name)) for f in fields(kernel)}
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _from_npz(payload: bytes) -> TreeKernel:
    with np.load(io.BytesIO(payload), allow_pickle=False) as arrays:
        values = {f.name: arrays[f.name] for f in fields(TreeKernel)}
    return TreeKernel(
        **{k: v for k, v in values.items() if v.ndim},
        base=float(values["base"]),
        n_features=int(values["n_features"]),
    )


def probe_rows(kernel: TreeKernel, n_rows: int = 1024, seed: int = 0) -> np.ndarray:
    """Rows that land on, just below and just above the model's own split values, and NaN.

    Every feature of every row is one of its thresholds, nudged by one float32 step
    down, none or up, with some NaNs mixed in, so the comparisons the kernel and ONNX
    Runtime could disagree on (``<`` against ``<=``, NaN direction) are all exercised.
    """
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(n_rows, kernel.n_features)).astype(np.float32)
    for f in range(kernel.n_features):
        values = kernel.thresholds[kernel.features == f]
        if values.size == 0:
            continue
        picked = rng.choice(values, n_rows)
        step = rng.integers(-1, 2, n_rows)
        picked = np.where(step < 0, np.nextafter(picked, np.float32(-np.inf)), picked)
        picked = np.where(step > 0, np.nextafter(picked, np.float32(np.inf)), picked)
        rows[:, f] = picked
    rows[rng.random(rows.shape) < 0.02] = np.nan
    return rows


class _Nodes:
    """The node table of one TreeEnsembleClassifier, indexed by (tree id, node id)."""

    def __init__(self, attrs: dict[str, Any]) -> None:
        self.trees = np.asarray(attrs["nodes_treeids"], np.int64)
        ids = np.asarray(attrs["nodes_nodeids"], np.int64)
        self.features = np.asarray(attrs["nodes_featureids"], np.int64)
        self.values = np.asarray(attrs["nodes_values"], np.float32)
        self.modes = list(attrs["nodes_modes"])
        self.true_ids = np.asarray(attrs["nodes_truenodeids"], np.int64)
        self.false_ids = np.asarray(attrs["nodes_falsenodeids"], np.int64)
        tracks = attrs.get("nodes_missing_value_tracks_true") or [0] * len(ids)
        self.nan_true = np.asarray(tracks, np.bool_)
        pairs = list(zip(self.trees.tolist(), ids.tolist(), strict=True))
        self.index = {pair: k for k, pair in enumerate(pairs)}
        self.roots: dict[int, int] = {}  # tree -> its lowest node id, the root
        for tree, node in pairs:
            self.roots[tree] = min(node, self.roots.get(tree, node))
        self.weights: dict[tuple[int, int], float] = {}
        for t, i, w in zip(
            attrs["class_treeids"], attrs["class_nodeids"], attrs["class_weights"], strict=True
        ):
            self.weights[(t, i)] = self.weights.get((t, i), 0.0) + float(w)
        bad = sorted(set(self.modes) - {"BRANCH_LEQ", "BRANCH_LT", "LEAF"})
        if bad:
            raise Unsupported(f"split modes {bad} are not covered")

    def compile(self, base: float, n_features: int) -> TreeKernel:
        features: list[int] = []
        thresholds: list[float] = []
        masks: list[np.uint64] = []
        nan_true: list[bool] = []
        strict: list[bool] = []
        split_start, leaf_values, leaf_start = [0], [], [0]
        for tree in sorted(self.roots):
            splits, leaves = self._walk(tree)
            if len(leaves) > MAX_LEAVES:
                raise Unsupported(f"tree {tree} has {len(leaves)} leaves > {MAX_LEAVES}")
            for k, left_from, left_to in splits:
                left = ((1 << (left_to - left_from)) - 1) << left_from
                features.append(int(self.features[k]))
                thresholds.append(float(self.values[k]))
                masks.append(np.uint64(~left & 0xFFFF_FFFF_FFFF_FFFF))
                nan_true.append(bool(self.nan_true[k]))
                strict.append(self.modes[k] == "BRANCH_LT")
            split_start.append(len(features))
            leaf_values.extend(leaves)
            leaf_start.append(len(leaf_values))
        return TreeKernel(
            np.asarray(features, np.int64),
            np.asarray(thresholds, np.float32),
            np.asarray(masks, np.uint64),
            np.asarray(nan_true, np.bool_),
            np.asarray(strict, np.bool_),
            np.asarray(split_start, np.int64),
            np.asarray(leaf_values, np.float64),
            np.asarray(leaf_start, np.int64),
            base,
            n_features,
        )

    def _walk(self, tree: int) -> tuple[list[tuple[int, int, int]], list[float]]:
        """Splits as (node, first left leaf, end of left leaves) and leaf weights, in order."""
        splits: list[tuple[int, int, int]] = []
        leaves: list[float] = []
        # (node id, split slot to finish or -1)
        stack: list[tuple[int, int]] = [(self.roots[tree], -1)]
        while stack:
            node, slot = stack.pop()
            if slot >= 0:  # back from the true (left) subtree: its leaves end here
                split, first, _ = splits[slot]
                splits[slot] = (split, first, len(leaves))
                continue
            k = self.index.get((tree, node))
            if k is None:
                raise Unsupported(f"tree {tree} refers to a missing node {node}")
            if self.modes[k] == "LEAF":
                leaves.append(self.weights.get((tree, node), 0.0))
                continue
            splits.append((k, len(leaves), -1))
            # visit true (left) subtree, then close its leaf range, then the false subtree
            stack.append((int(self.false_ids[k]), -1))
            stack.append((node, len(splits) - 1))
            stack.append((int(self.true_ids[k]), -1))
        return splits, leaves


def node_attributes(node: Any) -> dict[str, Any]:
    """The node's attributes as Python values, strings decoded."""
    from onnx import helper

    def plain(value: Any) -> Any:
        if isinstance(value, bytes):
            return value.decode()
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    return {a.name: plain(helper.get_attribute_value(a)) for a in node.attribute}
