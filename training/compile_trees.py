"""A binary HistGradientBoostingClassifier compiled to standard ONNX tensor operators (GEMM).

Why: ONNX Runtime has no CUDA kernel for the `ai.onnx.ml` TreeEnsemble operators that
skl2onnx writes, so a tree model asked onto a GPU runs on the CPU and pays copies.
Written as gathers, comparisons and batched matrix products (the GEMM strategy of
Hummingbird, Nakandala et al., OSDI 2020), every node has a CUDA kernel, and a CUDA
graph can capture the whole model. Our own code rather than Hummingbird's: that
package converts through PyTorch, a dependency of gigabytes for about two hundred lines
(docs/architecture.md).

Per tree t with internal nodes i and leaves l, trees padded to the largest counts:

- ``go_left[t, i, n]`` = ``x[n, feature[t, i]] <= threshold[t, i]``, or the node's
  missing-value direction where that input is NaN: the input is transposed and stacked
  on a copy with NaN as minus infinity, which the nodes whose NaN goes left read
  (``Transpose``, ``IsNaN``, ``Where``, ``Concat`` on the small input, then one
  ``Gather`` and one ``LessOrEqual`` over every split);
- ``path[t, l, i]`` is +1 if leaf l lies in node i's left subtree, -1 if in its right
  subtree, else 0, and ``left_count[t, l]`` counts the left turns on l's path, held as
  one more column of ``path`` against a split every row passes: ``path @ go_left`` (one
  batched float16 ``MatMul`` of small integers, exact) is 0 at the leaf the row reaches
  and negative at every other, so ``ArgMax`` over the leaves finds it;
- the reached leaf's value is gathered and summed over trees in float32 (no matrix
  product touches a leaf value, so a GPU's reduced precision cannot round it).

The tensors as large as rows x splits are one float32 gather, its boolean comparison
and the float16 product: the GPU's time at large batches is memory traffic.

P(up) is the logistic of the sum plus the baseline; the outputs (``label`` int64 [N],
``probabilities`` float [N, 2]) and the input (``X`` float [N, F]) are those skl2onnx
gives the same model, so either export can replace the other while serving.

scikit-learn compares float64 thresholds with the input widened from float32; the
float32 threshold here is the largest float32 not above it, which sends every float32
input the same way. Categorical splits are not covered (`compile_hgb` refuses them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from inference.gemm_kernel import GRAPH_NAME, PADDING_LEAF
from tickserve.errors import ModelRejected

OPSET = 17


@dataclass(frozen=True, slots=True)
class GemmTrees:
    """The arrays of one compiled ensemble, trees padded to `n_internal` and `n_leaves`.

    Attributes:
        features: (n_trees, n_internal) int64 input column each node tests (0 if padding).
        thresholds: (n_trees, n_internal) float32 split values.
        nan_left: (n_trees, n_internal) bool, a NaN input goes left.
        paths: (n_trees, n_internal, n_leaves) float32 +1/-1/0 path matrix.
        left_counts: (n_trees, n_leaves) float32 left turns on each leaf's path (-1 if padding).
        leaf_values: (n_trees, n_leaves) float32 raw score of each leaf.
        base: Raw score every row starts from.
        classes: (2,) int64 class labels.
        n_features: Input width.
    """

    features: np.ndarray
    thresholds: np.ndarray
    nan_left: np.ndarray
    paths: np.ndarray
    left_counts: np.ndarray
    leaf_values: np.ndarray
    base: float
    classes: np.ndarray
    n_features: int

    @property
    def n_trees(self) -> int:
        """Trees in the ensemble."""
        return int(self.features.shape[0])

    def raw_score(self, X: np.ndarray) -> np.ndarray:
        """The summed raw score per row in numpy, the graph's arithmetic (a test oracle)."""
        x = np.asarray(X, np.float32)[:, self.features]  # (n, trees, internal)
        go_left = np.where(np.isnan(x), self.nan_left, x <= self.thresholds)
        hits = np.einsum("nti,til->ntl", go_left.astype(np.float32), self.paths)
        reached = hits == self.left_counts
        values = np.where(reached, self.leaf_values, np.float32(0))
        total: np.ndarray = values.sum(axis=(1, 2), dtype=np.float64)
        return total + self.base


def compile_hgb(model: Any) -> GemmTrees:
    """The GEMM arrays of a fitted binary `HistGradientBoostingClassifier`.

    Raises:
        ModelRejected: Not binary, or a tree with a categorical split.
    """
    classes = np.asarray(model.classes_)
    if classes.shape != (2,) or classes.dtype.kind not in "iub":
        raise ModelRejected(f"only binary integer classes are compiled, got {classes}")
    trees = [predictors[0] for predictors in model._predictors]
    tables = [_tree_table(p.nodes) for p in trees]
    n_internal = max(1, max(len(t.internal) for t in tables))
    n_leaves = max(len(t.leaves) for t in tables)
    n_trees = len(tables)
    features = np.zeros((n_trees, n_internal), np.int64)
    thresholds = np.zeros((n_trees, n_internal), np.float32)
    nan_left = np.zeros((n_trees, n_internal), np.bool_)
    paths = np.zeros((n_trees, n_internal, n_leaves), np.float32)
    left_counts = np.full((n_trees, n_leaves), -1.0, np.float32)
    leaf_values = np.zeros((n_trees, n_leaves), np.float32)
    for t, table in enumerate(tables):
        k = len(table.internal)
        features[t, :k] = table.features
        thresholds[t, :k] = table.thresholds
        nan_left[t, :k] = table.nan_left
        paths[t, :k, : len(table.leaves)] = table.paths
        left_counts[t, : len(table.leaves)] = table.left_counts
        leaf_values[t, : len(table.leaves)] = table.values
    base = float(np.asarray(model._baseline_prediction).ravel()[0])
    n_features = int(model.n_features_in_)
    return GemmTrees(
        features,
        thresholds,
        nan_left,
        paths,
        left_counts,
        leaf_values,
        base,
        classes.astype(np.int64),
        n_features,
    )


@dataclass(frozen=True, slots=True)
class _TreeTable:
    internal: list[int]
    leaves: list[int]
    features: np.ndarray
    thresholds: np.ndarray
    nan_left: np.ndarray
    paths: np.ndarray
    left_counts: np.ndarray
    values: np.ndarray


def _tree_table(nodes: np.ndarray) -> _TreeTable:
    """One tree's internal nodes, leaves (left to right) and the path matrix between them."""
    if np.any(nodes["is_categorical"][~nodes["is_leaf"].astype(bool)]):
        raise ModelRejected("a tree has a categorical split: not covered by the GEMM export")
    internal: list[int] = []
    leaves: list[int] = []
    turns: dict[int, list[tuple[int, float]]] = {}  # leaf -> (internal position, +1/-1)
    stack: list[tuple[int, list[tuple[int, float]]]] = [(0, [])]
    while stack:
        node, path = stack.pop()
        if nodes["is_leaf"][node]:
            turns[node] = path
            leaves.append(node)
            continue
        position = len(internal)
        internal.append(node)
        # right first on the stack, so leaves come out left to right
        stack.append((int(nodes["right"][node]), [*path, (position, -1.0)]))
        stack.append((int(nodes["left"][node]), [*path, (position, 1.0)]))
    paths = np.zeros((len(internal), len(leaves)), np.float32)
    left_counts = np.zeros(len(leaves), np.float32)
    for j, leaf in enumerate(leaves):
        for position, sign in turns[leaf]:
            paths[position, j] = sign
        left_counts[j] = sum(1 for _, sign in turns[leaf] if sign > 0)
    idx = np.asarray(internal, np.int64)
    return _TreeTable(
        internal,
        leaves,
        nodes["feature_idx"][idx].astype(np.int64),
        _float32_at_most(nodes["num_threshold"][idx]),
        nodes["missing_go_to_left"][idx].astype(np.bool_),
        paths,
        left_counts,
        nodes["value"][np.asarray(leaves, np.int64)].astype(np.float32),
    )


def _float32_at_most(values: np.ndarray) -> np.ndarray:
    """The largest float32 <= each float64 value: ``x <= t`` then holds for float32 x alike."""
    rounded = np.asarray(values, np.float64).astype(np.float32)
    above = rounded.astype(np.float64) > values
    rounded[above] = np.nextafter(rounded[above], np.float32(-np.inf))
    return rounded


def to_onnx(trees: GemmTrees) -> Any:
    """The ONNX graph (onnx.ModelProto, standard operators only) scoring `trees`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    t, i = trees.features.shape
    n_leaves = trees.paths.shape[2]
    f = trees.n_features
    rows, thresholds, paths = _split_tables(trees)

    def const(name: str, value: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(np.ascontiguousarray(value), name)

    initializers = [
        const("features", rows),
        const("thresholds", thresholds.reshape(-1, 1)),
        const("paths", paths),
        const("tree_shape", np.array([t, i + 1, -1], np.int64)),
        const("leaf_offsets", (np.arange(t, dtype=np.int64) * n_leaves).reshape(t, 1)),
        const("leaf_values", trees.leaf_values.reshape(-1)),
        const("minus_inf", np.array(-np.inf, np.float32)),
        const("base", np.array(trees.base, np.float32)),
        const("one", np.array(1.0, np.float32)),
        const("half", np.array(0.5, np.float32)),
        const("tree_axis", np.array([0], np.int64)),
        const("column_axis", np.array([1], np.int64)),
        const("classes", trees.classes),
    ]
    node = helper.make_node
    nodes = [
        # X transposed, then again with NaN as -inf: a node whose NaN goes left reads the
        # second copy (-inf <= t), one whose NaN goes right the first (NaN <= t is false)
        node("Transpose", ["X"], ["columns"], perm=[1, 0]),
        node("IsNaN", ["columns"], ["missing"]),
        node("Where", ["missing", "minus_inf", "columns"], ["columns_nan_left"]),
        node("Concat", ["columns", "columns_nan_left"], ["inputs"], axis=0),
        node("Gather", ["inputs", "features"], ["tested"], axis=0),
        node("LessOrEqual", ["tested", "thresholds"], ["go_left"]),
        node("Cast", ["go_left"], ["go_left_h"], to=TensorProto.FLOAT16),
        node("Reshape", ["go_left_h", "tree_shape"], ["go_left_tin"]),
        # turns minus the leaf's left count: 0 at the reached leaf, negative elsewhere
        node("MatMul", ["paths", "go_left_tin"], ["misses"]),
        node("ArgMax", ["misses"], ["leaf"], axis=1, keepdims=0),
        node("Add", ["leaf", "leaf_offsets"], ["leaf_index"]),
        node("Gather", ["leaf_values", "leaf_index"], ["leaf_scores"], axis=0),
        node("ReduceSum", ["leaf_scores", "tree_axis"], ["tree_sum"], keepdims=0),
        node("Add", ["tree_sum", "base"], ["raw"]),
        node("Sigmoid", ["raw"], ["p_up"]),
        node("Unsqueeze", ["p_up", "column_axis"], ["p_up_col"]),
        node("Sub", ["one", "p_up_col"], ["p_down_col"]),
        node("Concat", ["p_down_col", "p_up_col"], ["probabilities"], axis=1),
        # scikit-learn's argmax: a tie (exactly 0.5) is the first class
        node("Greater", ["p_up", "half"], ["is_up"]),
        node("Cast", ["is_up"], ["class_index"], to=TensorProto.INT64),
        node("Gather", ["classes", "class_index"], ["label"], axis=0),
    ]
    graph = helper.make_graph(
        nodes,
        GRAPH_NAME,  # how inference.gemm_kernel recognises the graph
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, f])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2]),
        ],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tickserve"
    )
    model.ir_version = 8  # what onnxruntime 1.2x/1.3x reads, as skl2onnx writes
    onnx.checker.check_model(model)
    return model


def _split_tables(trees: GemmTrees) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The graph's tensors: each split's input row, its threshold, the leaf-by-split paths.

    Rows index the transposed input stacked on its NaN-as-minus-infinity copy (a split
    whose NaN goes left reads row ``n_features + feature``). Each tree gets one extra
    split that every row passes (row ``n_features``, threshold +inf), whose column in
    ``paths`` holds minus the leaf's left count, so the product is 0 at the reached leaf
    and negative at every other; a padding leaf gets ``PADDING_LEAF``. All entries are
    small integers, exact in float16.
    """
    t, i = trees.features.shape
    rows = np.full((t, i + 1), trees.n_features, np.int64)
    rows[:, :i] = trees.features + np.where(trees.nan_left, trees.n_features, 0)
    thresholds = np.full((t, i + 1), np.inf, np.float32)
    thresholds[:, :i] = trees.thresholds
    paths = np.empty((t, trees.paths.shape[2], i + 1), np.float16)
    paths[:, :, :i] = trees.paths.transpose(0, 2, 1)
    padding = trees.left_counts < 0
    paths[:, :, i] = np.where(padding, PADDING_LEAF, -trees.left_counts)
    return rows.reshape(-1), thresholds.reshape(-1), paths
