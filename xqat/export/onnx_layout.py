"""ONNX rewrites so onnx2tf keeps every tensor channels-last: TFLite then needs no layout TRANSPOSE.

* A channel-major Flatten of [N, C, *S] whose users are all Linear layers (Gemm, through its activation
  Q/DQ): a Transpose to [N, *S, C] goes in front (the data onnx2tf already holds), and each Gemm weight's
  input columns are permuted to match; the column order is returned so the report compares torch's codes
  in that order.
* A channel shuffle (Reshape / Transpose / Reshape, as torchvision's ShuffleNet) runs on the channels-last view.
* Slice / Split bounds made by Constant nodes become initializers, so onnx2tf maps the channel axis.
* A Pad with an explicit value of 0 loses it, so TFLite gets PAD rather than PADV2 (EdgeTPU).

Every rewrite computes the same ONNX values; the inserted Transposes carry NHWC_VIEW / NCHW_VIEW in their
names, and the onnx2tf adapter passes them through.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ExportError
from .onnx_fold import onnx_constants

__all__ = ["NCHW_VIEW", "NHWC_VIEW", "sequence_inputs", "channels_last_flatten", "channels_last_shuffle",
           "slice_bounds_as_initializers", "zero_pads_without_value"]

# name suffixes of the Transposes inserted here, which the onnx2tf adapter passes through as they are in TF:
NHWC_VIEW = "__xqat_nhwc_view"  # Transpose(0, 2, ..., 1) to channels-last: onnx2tf holds the data that way already
NCHW_VIEW = "__xqat_nchw_view"  # Transpose(0, 3, 1, 2) back: the data stays, onnx2tf's channels-last form again

_BOUNDS = {"Slice": (1, 2, 3, 4), "Split": (1,)}  # inputs that are starts / ends / axes / steps / split sizes


def slice_bounds_as_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Slice / Split bounds that come from Constant nodes, moved into initializers of their own.

    onnx2tf maps a Slice's NCHW axis to its NHWC axis only when every bound input is an initializer; a bound
    made by a Constant node (torch's chunk after the Shape arithmetic is folded) counts as already in TF layout,
    so channel axis 1 would be taken as H. A bound still computed at run time after constant folding gets
    the same wrong axis (a channel slice of [N, C, H, W] became a [0, 4, 2, 0] tensor): ExportError."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    made = {n.output[0]: n for n in g.node if n.op_type == "Constant" and n.output}
    producers = {o: n for n in g.node for o in n.output}
    inits = {i.name for i in g.initializer}
    for n in g.node:
        for i in _BOUNDS.get(n.op_type, ()):
            if i < len(n.input) and n.input[i] in made:
                value = next(a.t for a in made[n.input[i]].attribute if a.name == "value")
                name = f"{n.name}_bound{i}"
                g.initializer.append(numpy_helper.from_array(numpy_helper.to_array(value), name))
                n.input[i] = name
            elif i < len(n.input) and n.input[i] and n.input[i] not in inits:
                src = producers.get(n.input[i])
                raise ExportError(
                    f"{n.op_type} '{n.name}' of tensor '{n.input[0]}': its bound '{n.input[i]}' is computed at run "
                    f"time (by {src.op_type if src else 'a graph input'}), and onnx2tf cannot map such a slice to "
                    "channels-last; slice with constant bounds (Python ints, static shapes)")
    return out


def zero_pads_without_value(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant Pads whose value is a constant 0 (torch's F.pad) lose the value input (ONNX's default is 0):
    onnx2tf passes a given value on as a tensor and TF then emits PadV2, which the EdgeTPU does not map;
    without it the same padding is a PAD (fills with the zero point, i.e. 0.0)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    consts = onnx_constants(out)
    for n in out.graph.node:
        mode = next((a.s for a in n.attribute if a.name == "mode"), b"constant")
        if n.op_type == "Pad" and mode == b"constant" and len(n.input) > 2 and n.input[2] in consts \
                and consts[n.input[2]].size == 1 and float(consts[n.input[2]].reshape(-1)[0]) == 0.0:
            del n.input[2]
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


def sequence_inputs(model: onnx.ModelProto) -> list[str]:
    """The 3-D graph inputs to keep in torch's (N, T, F) layout: all of them when no Conv reads a 3-D tensor.

    onnx2tf takes every 3-D tensor for channels-first (N, C, W) and stores it as (N, W, C); right for Conv1d,
    wrong for a sequence whose last axis is the features (Linear, LSTM/GRU): FULLY_CONNECTED would need a
    TRANSPOSE in front. A model with a Conv1d keeps onnx2tf's channels-last view of all its 3-D tensors. A square
    (N, T, T) input is kept too (the onnx2tf adapter marks its Q/DQ as plain, see `_Handlers._keep_plain`)."""
    if any(n.op_type == "Conv" and len(a.ints) == 1 for n in model.graph.node for a in n.attribute
           if a.name == "kernel_shape"):
        return []
    inits = {i.name for i in model.graph.initializer}
    inputs = [(i.name, [d.dim_value for d in i.type.tensor_type.shape.dim]) for i in model.graph.input
              if i.name not in inits]
    return [name for name, dims in inputs if len(dims) == 3]


def channels_last_flatten(model: onnx.ModelProto, sequence_layout: bool = False
                          ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The model with each channel-major Flatten that only feeds Linear layers made channels-last (see the
    module docstring), and for each rewritten weight initializer its new column order (new column j = old
    column order[j]). In the sequence layout (`sequence_inputs`), 3-D tensors are already in torch's order."""
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
        if not flat or not shape or len(shape) < 3 + sequence_layout or -1 in shape or int(np.prod(shape[2:])) == 1:
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
        new_nodes.append(helper.make_node("Transpose", [n.input[0]], [moved], name=n.name + NHWC_VIEW,
                                          perm=[0, *range(2, len(shape)), 1]))
        n.input[0] = moved
        new_nodes.append(n)
    del g.node[:]
    g.node.extend(new_nodes)
    return out, orders


def _through_qdq(name: str, consumers: dict) -> tuple[str, onnx.NodeProto] | None:
    """(tensor, its single user) after `name`, looking through one activation Q -> DQ pair."""
    users = consumers.get(name, [])
    if len(users) == 1 and users[0].op_type == "QuantizeLinear":
        dqs = consumers.get(users[0].output[0], [])
        if len(dqs) != 1 or dqs[0].op_type != "DequantizeLinear":
            return None
        name = dqs[0].output[0]
        users = consumers.get(name, [])
    return (name, users[0]) if len(users) == 1 else None


def channels_last_shuffle(model: onnx.ModelProto) -> onnx.ModelProto:
    """A channel shuffle (Reshape [N, g, C/g, H, W] -> Transpose(0, 2, 1, 3, 4) -> Reshape [N, C, H, W], as
    torchvision's ShuffleNet) rewritten on the channels-last view: Transpose to [N, H, W, C] (no op for
    onnx2tf), Reshape [N, H, W, g, C/g], Transpose(0, 1, 2, 4, 3), Reshape [N, H, W, C], Transpose back (named
    with NCHW_VIEW: the onnx2tf adapter keeps the data as is and marks it channels-last again).
    TFLite then runs it as RESHAPE + one TRANSPOSE on the channel groups, with no layout transposes around it."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    shapes = _shapes(out)
    inits = {i.name: i for i in g.initializer}
    consts = onnx_constants(out)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    before: dict[str, onnx.NodeProto] = {}  # node name -> node to insert in front of it
    after: dict[str, onnx.NodeProto] = {}
    for r1 in g.node:
        x_shape = shapes.get(r1.input[0]) if r1.op_type == "Reshape" else None
        if not x_shape or len(x_shape) != 4 or -1 in x_shape or r1.input[1] not in consts:
            continue
        n, c, h, w = x_shape
        s1 = consts[r1.input[1]].tolist()
        if len(s1) != 5 or s1[0] != n or s1[3:] != [h, w] or s1[1] * s1[2] != c:
            continue
        t = _through_qdq(r1.output[0], consumers)
        if t is None or t[1].op_type != "Transpose":
            continue
        tr = t[1]
        if list(next(a.ints for a in tr.attribute if a.name == "perm")) != [0, 2, 1, 3, 4]:
            continue
        r = _through_qdq(tr.output[0], consumers)
        if r is None or r[1].op_type != "Reshape" or r[1].input[1] not in consts:
            continue
        r2 = r[1]
        s2 = consts[r2.input[1]].tolist()
        if s2 not in ([n, c, h, w], [n, -1, h, w]):
            continue
        groups = s1[1]
        moved = r1.input[0] + "__nhwc"
        before[r1.name] = helper.make_node("Transpose", [r1.input[0]], [moved], name=r1.name + NHWC_VIEW,
                                           perm=[0, 2, 3, 1])
        r1.input[0] = moved
        _set_shape(g, inits, r1, [n, h, w, groups, c // groups])
        next(a for a in tr.attribute if a.name == "perm").ints[:] = [0, 1, 2, 4, 3]
        _set_shape(g, inits, r2, [n, h, w, c])
        nhwc_out = r2.output[0] + "__nhwc"
        after[r2.name] = helper.make_node("Transpose", [nhwc_out], [r2.output[0]], name=r2.name + NCHW_VIEW,
                                          perm=[0, 3, 1, 2])
        r2.output[0] = nhwc_out
    if not before:
        return out
    nodes = []
    for n in g.node:
        nodes += [before[n.name]] if n.name in before else []
        nodes.append(n)
        nodes += [after[n.name]] if n.name in after else []
    del g.node[:]
    g.node.extend(nodes)
    return out


def _set_shape(g: onnx.GraphProto, inits: dict, node: onnx.NodeProto, shape: list[int]) -> None:
    name = node.name + "_shape"
    g.initializer.append(numpy_helper.from_array(np.asarray(shape, np.int64), name))
    inits[name] = g.initializer[-1]
    node.input[1] = name
