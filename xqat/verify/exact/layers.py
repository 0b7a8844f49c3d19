"""What each fake-quant point of a QAT model computes on the device: the layer between the point and the points
that feed it, read from the fx graph (`plan_layers`). Layers outside the supported set are refused, all at once,
each named (exact numerics never approximate, docs/numerics.md#exact-training-numerics)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.utils import _pair

from ...errors import UnsupportedLayerError
from ...torch_side.capture import check_input
from ...torch_side.modules import QAdd, QConv2d, QLinear
from ...torch_side.patterns import OpKind, arg, classify, describe, tensor_inputs
from ...torch_side.prepare import point_key, point_module

__all__ = ["Layer", "plan_layers"]

_TFLITE_AXIS_4D = {1: 3, 2: 1, 3: 2}  # NCHW dim -> NHWC axis


@dataclass
class Layer:
    """The device op that produces one point's tensor, from the tensors of `inputs` (point keys)."""

    kind: str  # input, conv, fc, add, avgpool, mean, cat, lut, copy
    label: str
    inputs: list[str] = field(default_factory=list)  # point keys of the op's tensor inputs
    nodes: list[fx.Node] = field(default_factory=list)  # the graph nodes carrying them
    module: nn.Module | None = None  # QConv2d / QLinear / QAdd
    params: dict = field(default_factory=dict)


def plan_layers(gm: fx.GraphModule) -> dict[str, Layer]:
    """Point key -> its `Layer`, in graph order; UnsupportedLayerError naming every layer that cannot be computed
    exactly."""
    layers: dict[str, Layer] = {}
    problems: list[str] = []
    for node in gm.graph.nodes:
        key = point_key(node)
        if key is None:
            continue
        point = point_module(gm, key)
        try:
            layers[key] = _layer(gm, node.args[0], point)
        except _Refused as e:
            problems.append(f"'{point.label}' ({describe(gm, node.args[0])}): {e}")
    if problems:
        raise UnsupportedLayerError("exact numerics cannot compute these layers bit for bit (only conv / depthwise "
                                    "conv / linear with fused ReLU/ReLU6 and BN, add, average / max / global "
                                    "pooling, mean, concat, reshape, sigmoid and tanh are supported); keep "
                                    "numerics='tf' for this model:\n  " + "\n  ".join(problems))
    return layers


class _Refused(Exception):
    pass


def _inputs(gm: fx.GraphModule, anchor: fx.Node) -> tuple[list[str], list[fx.Node]]:
    keys, nodes = [], []
    for first in tensor_inputs(anchor):
        # Between the input's point and this op: identities in eval (Identity, Dropout, DropPath; no device op, the
        # point's value is read instead) and same-scale copies without a point of their own (a flatten the
        # converter folds: the copied grid values are read, on the point's grid)
        n, copies = first, False
        while point_key(n) is None and n.op.startswith("call_") and tensor_inputs(n):
            kind = classify(gm, n)[0]
            if kind not in (OpKind.PASS_THROUGH, OpKind.SAME_SCALE):
                break
            copies = copies or kind is OpKind.SAME_SCALE
            n = tensor_inputs(n)[0]
        k = point_key(n)
        if k is None:
            raise _Refused(f"its input '{first.name}' ({describe(gm, first)}) is not a quantized tensor of the model")
        keys.append(k)
        nodes.append(first if copies else n)
    return keys, nodes


def _layer(gm: fx.GraphModule, anchor: fx.Node, point) -> Layer:
    label = point.label
    if anchor.op == "placeholder" or (anchor.op == "call_function" and anchor.target is check_input):
        return Layer("input", label, nodes=[anchor])
    keys, nodes = _inputs(gm, anchor)
    module = gm.get_submodule(anchor.target) if anchor.op == "call_module" else None
    shape = tuple(anchor.meta["tensor_meta"].shape) if "tensor_meta" in anchor.meta else None
    if isinstance(module, QConv2d):
        c = module.conv
        if type(c) is not nn.Conv2d or c.padding_mode != "zeros":
            raise _Refused(f"{type(c).__name__} (padding_mode {c.padding_mode!r}); only Conv2d with zero padding")
        return Layer("conv", label, keys, nodes, module)
    if isinstance(module, QLinear):
        if len(anchor.args[0].meta["tensor_meta"].shape) != 2:
            raise _Refused("Linear on a tensor of rank > 2")
        return Layer("fc", label, keys, nodes, module)
    if isinstance(module, QAdd):
        if len(keys) != 2:
            raise _Refused("an add with a constant operand")
        return Layer("add", label, keys, nodes, module)
    kind, detail = classify(gm, anchor)
    if kind is OpKind.SAME_SCALE and point.passthrough:  # max pool, reshape, flatten, ...: codes are copied
        return Layer("copy", label, keys, nodes)
    if kind is OpKind.CAT:
        rank = len(shape)
        dim = int(arg(anchor, 1, "dim", 0)) % rank
        axis = _TFLITE_AXIS_4D[dim] if rank == 4 else dim
        if dim == 0:
            raise _Refused("concat along the batch dimension")
        return Layer("cat", label, keys, nodes, params={"axis": axis})
    if kind is OpKind.FIXED and detail in ("sigmoid", "tanh"):
        return Layer("lut", label, keys, nodes, params={"op": "LOGISTIC" if detail == "sigmoid" else "TANH"})
    if kind in (OpKind.AVGPOOL, OpKind.MEAN):
        return _pooling(anchor, module, keys, nodes, label, shape)
    raise _Refused(f"{kind.value} ops have no exact integer form in xqat yet" + (f" ({detail})" if detail else ""))


def _pooling(anchor: fx.Node, module: nn.Module | None, keys, nodes, label: str, shape) -> Layer:
    in_shape = tuple(anchor.args[0].meta["tensor_meta"].shape)
    adaptive = isinstance(module, nn.AdaptiveAvgPool2d) or anchor.target is F.adaptive_avg_pool2d
    name = anchor.target if isinstance(anchor.target, str) else getattr(anchor.target, "__name__", "")
    if adaptive or name == "mean":
        if adaptive:
            dims, keep = {2, 3}, True
            if tuple(shape[2:]) != (1, 1):
                raise _Refused(f"adaptive average pooling to {tuple(shape[2:])}; only global (1, 1)")
        else:
            d = arg(anchor, 1, "dim")
            dims = {int(v) % len(in_shape) for v in (d if isinstance(d, (list, tuple)) else [d])}
            keep = bool(arg(anchor, 2, "keepdim", False))
        if len(in_shape) != 4 or dims != {2, 3}:
            raise _Refused(f"mean over dims {sorted(dims)} of a rank-{len(in_shape)} tensor; only the spatial mean "
                           "of an NCHW tensor")
        return Layer("mean", label, keys, nodes, params={"keep": keep})
    if isinstance(module, nn.AvgPool2d):
        k, s, p = module.kernel_size, module.stride, module.padding
        ceil, div = module.ceil_mode, module.divisor_override
    else:
        k, s, p = arg(anchor, 1, "kernel_size"), arg(anchor, 2, "stride"), arg(anchor, 3, "padding", 0)
        ceil, div = arg(anchor, 4, "ceil_mode", False), arg(anchor, 6, "divisor_override")
    k = _pair(k)
    s = _pair(s) if s not in (None, []) else k
    if _pair(p) != (0, 0) or ceil or div:
        raise _Refused("average pooling with padding, ceil_mode or divisor_override")
    return Layer("avgpool", label, keys, nodes, params={"kernel": k, "stride": s})
