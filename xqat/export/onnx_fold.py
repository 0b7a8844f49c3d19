"""ONNX constant folding: the part of onnxsim that onnx2tf's layout handling relies on (onnxsim is not run):
constant subgraphs, and the Shape of a tensor whose shape is static."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["onnx_constants", "fold_constants"]


def onnx_constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every initializer and Constant node output of `model`, by tensor name, as numpy arrays."""
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type != "Constant" or not n.output:
            continue
        for a in n.attribute:
            if a.name == "value":
                consts[n.output[0]] = numpy_helper.to_array(a.t)
            elif a.name in ("value_float", "value_int", "value_floats", "value_ints"):
                v = onnx.helper.get_attribute_value(a)
                consts[n.output[0]] = np.asarray(v, np.float32 if "float" in a.name else np.int64)
    return consts


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int] | None]:
    """Tensor name -> its shape from ONNX shape inference where every dimension is known (else None)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is an optimisation here; onnx2tf still sees the graph as it is
        return {}
    out: dict[str, list[int] | None] = {}
    for v in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = v.type.tensor_type.shape.dim
        known = [d.dim_value for d in dims if d.HasField("dim_value") and d.dim_value > 0]
        out[v.name] = known if v.type.tensor_type.HasField("shape") and len(known) == len(dims) else None
    return out


_NEVER_FOLD = {"QuantizeLinear", "DequantizeLinear", "Constant"}


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Evaluate every node whose inputs are all constants (shape arithmetic such as the pads torch
    computes for F.pad) into an initializer, and drop what becomes dead. This is the part of onnxsim
    that onnx2tf's layout handling relies on; onnxsim itself is not run. Q/DQ pairs are kept.

    Repeated until nothing more folds: a Slice with computed bounds (torch's chunk) has an unknown output
    shape until its bounds are folded, so the Shape of any tensor after it (the next chunk's) only becomes
    static in the next pass. A chain of grouped convs (RegNet) needs one pass per grouped conv."""
    out, folded = _fold_once(model)
    while folded:
        out, folded = _fold_once(out)
    return out


def _fold_once(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """One folding pass over a copy of `model`, with the static shapes known before it; the number folded."""
    from onnx.reference import ReferenceEvaluator

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    consts = onnx_constants(out)
    opsets = list(out.opset_import)
    folded: dict[str, np.ndarray] = {}
    static = _static_shapes(out)
    for n in g.node:
        if n.op_type == "Shape" and not n.attribute and static.get(n.input[0]) is not None:
            consts[n.output[0]] = folded[n.output[0]] = np.asarray(static[n.input[0]], np.int64)
            continue  # e.g. torch's chunk / split: shape arithmetic on a static shape, so Slice gets constants
        if (n.op_type in _NEVER_FOLD or n.domain not in ("", "ai.onnx") or not n.input
                or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute)
                or not all(x == "" or x in consts for x in n.input)):
            continue
        single = onnx.helper.make_model(
            onnx.helper.make_graph([n], "fold", [], [onnx.helper.make_tensor_value_info(o, 0, None) for o in n.output],
                                   [numpy_helper.from_array(np.asarray(consts[x]), x) for x in set(n.input) if x]),
            opset_imports=opsets)
        try:
            values = ReferenceEvaluator(single).run(None, {})
        except Exception:  # leave anything the reference runtime cannot evaluate to onnx2tf
            continue
        for name, v in zip(n.output, values):
            consts[name] = folded[name] = np.asarray(v)
    if not folded:
        return out, 0
    keep = [n for n in g.node if not (n.output and all(o in folded for o in n.output))]
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in folded.items())
    needed = {o.name for o in g.output}
    alive: list[onnx.NodeProto] = []
    for n in reversed(keep):  # dead-code elimination, graph order is topological
        if any(o in needed for o in n.output):
            alive.append(n)
            needed.update(x for x in n.input if x)
    del g.node[:]
    g.node.extend(reversed(alive))
    inits = [i for i in g.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    return out, len(folded)
