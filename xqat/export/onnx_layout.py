"""A channel-major flatten in front of a Linear, made channels-last so TFLite needs no TRANSPOSE.

torch flattens [N, C, *S] channel-major; onnx2tf keeps tensors channels-last, so a plain Flatten becomes
TRANSPOSE + RESHAPE. When every user of the flatten is a Gemm (through its activation Q/DQ), the same result
comes from flattening channels-last and permuting the Gemm weight's input columns to match: a Transpose to
[N, *S, C] (which onnx2tf turns into no op) goes in front of the Flatten, and the weight initializer's columns
are reordered. The column order is returned so the report can compare the torch codes in that order.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["channels_last_flatten", "slice_bounds_as_initializers"]

_BOUNDS = {"Slice": (1, 2, 3, 4), "Split": (1,)}  # inputs that are starts / ends / axes / steps / split sizes


def slice_bounds_as_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Slice / Split bounds that come from Constant nodes, moved into initializers of their own.

    onnx2tf maps a Slice's NCHW axis to its NHWC axis only when every bound input is an initializer; a bound
    made by a Constant node (torch's chunk after the Shape arithmetic is folded) counts as already in TF layout,
    so channel axis 1 would be taken as H."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    made = {n.output[0]: n for n in g.node if n.op_type == "Constant" and n.output}
    for n in g.node:
        for i in _BOUNDS.get(n.op_type, ()):
            if i < len(n.input) and n.input[i] in made:
                value = next(a.t for a in made[n.input[i]].attribute if a.name == "value")
                name = f"{n.name}_bound{i}"
                g.initializer.append(numpy_helper.from_array(numpy_helper.to_array(value), name))
                n.input[i] = name
    return out


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = onnx.shape_inference.infer_shapes(model)
    out = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
        out[v.name] = dims
    return out


def _gemm_weights(name: str, consumers: dict, inits: dict) -> list[str] | None:
    """Initializer names of the Gemm weights that read tensor `name` (directly or through its Q -> DQ), or None
    if anything else reads it."""
    out = []
    for user in consumers.get(name, []):
        if user.op_type == "QuantizeLinear":
            for dq in consumers.get(user.output[0], []):
                got = _gemm_weights(dq.output[0], consumers, inits) if dq.op_type == "DequantizeLinear" else None
                if got is None:
                    return None
                out += got
        elif user.op_type == "Gemm" and user.input[0] == name and not any(
                a.name == "transA" and a.i for a in user.attribute):
            trans_b = any(a.name == "transB" and a.i for a in user.attribute)
            w = _weight_initializer(user.input[1], consumers, inits)
            if w is None or not trans_b:
                return None
            out.append(w)
        else:
            return None
    return out


def _weight_initializer(dq_output: str, consumers: dict, inits: dict) -> str | None:
    for src, users in consumers.items():  # the initializer -> QuantizeLinear -> DequantizeLinear(dq_output)
        if src in inits:
            for q in users:
                if q.op_type == "QuantizeLinear" and any(dq.output[0] == dq_output
                                                         for dq in consumers.get(q.output[0], [])):
                    return src
    return None


def channels_last_flatten(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The model with each channel-major Flatten that only feeds Linear layers made channels-last (see the
    module docstring), and for each rewritten weight initializer its new column order (new column j = old
    column order[j])."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    shapes = _shapes(out)
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    orders: dict[str, np.ndarray] = {}
    new_nodes = []
    for n in g.node:
        shape = shapes.get(n.input[0]) if n.input else None
        flat = n.op_type == "Flatten" and all(a.i == 1 for a in n.attribute if a.name == "axis")
        if not flat or not shape or len(shape) < 3 or -1 in shape or int(np.prod(shape[2:])) == 1:
            new_nodes.append(n)
            continue
        weights = _gemm_weights(n.output[0], consumers, inits)
        if not weights or any(w in orders for w in weights):
            new_nodes.append(n)
            continue
        c, spatial = shape[1], shape[2:]
        order = np.arange(c * int(np.prod(spatial))).reshape(c, *spatial).transpose(*range(1, len(shape) - 1), 0)
        order = order.reshape(-1)
        for w in weights:
            arr = numpy_helper.to_array(inits[w])
            inits[w].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr[:, order]), w))
            orders[w] = order
        moved = n.input[0] + "__channels_last"
        new_nodes.append(helper.make_node("Transpose", [n.input[0]], [moved], name=n.name + "_channels_last",
                                          perm=[0, *range(2, len(shape)), 1]))
        n.input[0] = moved
        new_nodes.append(n)
    del g.node[:]
    g.node.extend(new_nodes)
    return out, orders
