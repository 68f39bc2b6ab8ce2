"""The tree kernel for an ensemble compiled to tensor operators, its arrays read from the graph.

`training.compile_trees` writes a gradient-boosted model as gathers and batched matrix
products, which a GPU runs well and ONNX Runtime's CPU kernels run slowly (every row
meets every node of every tree, plus a dense product per tree). The graph's tensors
still describe the trees exactly, so on the CPU the same model is scored by
`inference.trees.TreeKernel`: per tree, the splits are the rows of the path matrix
that are not padding, the leaves its columns (left to right), and a failed split
clears the leaves of its left subtree (the +1 entries of its row).

Like every kernel it serves only after reproducing ONNX Runtime on probe rows
(`inference.session.OnnxScorer`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from inference.trees import MAX_LEAVES, TreeKernel, Unsupported

GRAPH_NAME = "hgb_gemm"  # what `training.compile_trees` names its graphs
PADDING_LEAF = -1024.0  # a padding leaf's entry in the paths' last column (exact in float16)
_TENSORS = ("features", "thresholds", "paths", "leaf_offsets", "leaf_values", "base")


def compile_gemm_graph(model: Any, n_features: int) -> TreeKernel:
    """The TreeKernel of a graph written by `training.compile_trees` (onnx.ModelProto).

    Raises:
        Unsupported: Not such a graph, or a tree over `MAX_LEAVES` leaves.
    """
    from onnx import numpy_helper

    graph = model.graph
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    missing = [name for name in _TENSORS if name not in tensors]
    if graph.name != GRAPH_NAME or missing:
        raise Unsupported(f"graph {graph.name!r} is not a compiled ensemble (lacks {missing})")
    if int(np.asarray(tensors["features"]).max(initial=0)) >= 2 * n_features:
        raise Unsupported("a split reads a feature past the input width")
    features, thresholds, nan_left, paths, left_counts = _split_tables(
        tensors["features"], tensors["thresholds"], tensors["paths"], n_features
    )
    n_trees, n_internal, _ = paths.shape
    leaf_values = np.asarray(tensors["leaf_values"], np.float32).reshape(n_trees, -1)
    split_at, masks, leaves, leaf_start = [], [], [], [0]
    for t in range(n_trees):
        n_leaves = int(np.count_nonzero(left_counts[t] >= 0))  # padding leaves count -1
        if n_leaves > MAX_LEAVES:
            raise Unsupported(f"tree {t} has {n_leaves} leaves > {MAX_LEAVES}")
        for i in range(n_internal):
            left = paths[t, i, :n_leaves] > 0
            if not np.any(paths[t, i]):  # padding
                continue
            bits = int(np.sum(np.left_shift(np.uint64(1), np.flatnonzero(left).astype(np.uint64))))
            split_at.append((t, i))
            masks.append(np.uint64(~bits & 0xFFFF_FFFF_FFFF_FFFF))
        leaves.extend(leaf_values[t, :n_leaves].tolist())
        leaf_start.append(len(leaves))
    split_start = np.searchsorted([t for t, _ in split_at], np.arange(n_trees + 1))
    index = tuple(np.asarray(split_at, np.int64).reshape(-1, 2).T)
    return TreeKernel(
        features[index],
        thresholds[index],
        np.asarray(masks, np.uint64),
        nan_left[index],
        np.zeros(len(split_at), np.bool_),  # x <= t, as LessOrEqual
        split_start.astype(np.int64),
        np.asarray(leaves, np.float64),
        np.asarray(leaf_start, np.int64),
        float(np.asarray(tensors["base"]).reshape(-1)[0]),
        n_features,
    )


def _split_tables(
    rows: np.ndarray, thresholds: np.ndarray, paths: np.ndarray, n_features: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The graph's split tensors read back: features, thresholds, nan_left, paths, left counts.

    `training.compile_trees` writes, per tree, each split's row in the transposed input
    stacked on its NaN-as-minus-infinity copy (``n_features + feature`` where NaN goes
    left), and ``paths`` as leaves x splits with one last split every row passes, whose
    column is minus the leaf's left count (`PADDING_LEAF` for a padding leaf).
    """
    n_trees, _, width = paths.shape
    rows = np.asarray(rows, np.int64).reshape(n_trees, width)[:, :-1]
    bias = np.asarray(paths[:, :, -1], np.float32)
    left_counts = np.where(bias == PADDING_LEAF, np.float32(-1), -bias).astype(np.float32)
    return (
        rows % n_features,
        np.asarray(thresholds, np.float32).reshape(n_trees, width)[:, :-1],
        rows >= n_features,
        np.asarray(paths[:, :, :-1], np.float32).transpose(0, 2, 1),
        left_counts,
    )
