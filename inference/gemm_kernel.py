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
_TENSORS = ("features", "thresholds", "nan_left", "paths", "left_counts", "leaf_values", "base")


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
    paths = np.asarray(tensors["paths"], np.float32)
    n_trees, n_internal, _ = paths.shape
    features = np.asarray(tensors["features"], np.int64).reshape(n_trees, n_internal)
    thresholds = np.asarray(tensors["thresholds"], np.float32).reshape(n_trees, n_internal)
    nan_left = np.asarray(tensors["nan_left"], np.bool_).reshape(n_trees, n_internal)
    left_counts = np.asarray(tensors["left_counts"], np.float32).reshape(n_trees, -1)
    leaf_values = np.asarray(tensors["leaf_values"], np.float32).reshape(n_trees, -1)
    if features.size and int(features.max()) >= n_features:
        raise Unsupported("a split reads a feature past the input width")
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
