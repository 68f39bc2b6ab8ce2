"""Rewrites the `ai.onnx.ml` helper operators skl2onnx puts around a network into standard ones.

skl2onnx exports `make_pipeline(StandardScaler(), MLPClassifier())` as a `Scaler` node,
the network (MatMul, Add, Relu, Sigmoid) and an `ArrayFeatureExtractor` that maps the
argmax to a class label. Those two are `ai.onnx.ml` operators, which ONNX Runtime runs
only on the CPU: on a GPU the graph would be cut in three, with copies between the
parts, and no CUDA graph could capture it. Both have exact standard equivalents:

- ``Scaler(X; offset, scale)`` is ``(X - offset) * scale`` (``Sub``, ``Mul``);
- ``ArrayFeatureExtractor(classes, index)`` on a 1-D ``classes`` is
  ``Gather(classes, index, axis=0)``.

Any other `ai.onnx.ml` operator is left as it is, and `ml_operators` names it.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def ml_operators(model: Any) -> list[str]:
    """The `ai.onnx.ml` operator types left in `model`'s graph (empty: standard only)."""
    return [n.op_type for n in model.graph.node if n.domain == "ai.onnx.ml"]


def to_standard_ops(model: Any) -> Any:
    """A copy of `model` (onnx.ModelProto) with Scaler and 1-D ArrayFeatureExtractor rewritten."""
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    ranks = {init.name: len(init.dims) for init in graph.initializer}
    nodes = []
    for k, node in enumerate(graph.node):
        if node.domain == "ai.onnx.ml" and node.op_type == "Scaler":
            attrs = {a.name: list(a.floats) for a in node.attribute}
            offset, scale = f"scaler_offset_{k}", f"scaler_scale_{k}"
            shifted = f"scaler_shifted_{k}"
            for name, values in ((offset, attrs["offset"]), (scale, attrs["scale"])):
                graph.initializer.append(
                    numpy_helper.from_array(np.asarray(values, np.float32), name)
                )
            nodes.append(helper.make_node("Sub", [node.input[0], offset], [shifted]))
            nodes.append(helper.make_node("Mul", [shifted, scale], list(node.output)))
        elif (
            node.domain == "ai.onnx.ml"
            and node.op_type == "ArrayFeatureExtractor"
            and ranks.get(node.input[0]) == 1
        ):
            gather = helper.make_node("Gather", list(node.input), list(node.output), axis=0)
            nodes.append(gather)
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    if not ml_operators(out):
        kept = [o for o in out.opset_import if o.domain != "ai.onnx.ml"]
        del out.opset_import[:]
        out.opset_import.extend(kept)
    onnx.checker.check_model(out)
    return out
