"""What each torch.fx node is, in quantization terms: the op vocabulary `prepare_qat` understands.

Every node maps to one `OpKind`; the kind decides fusion and where the int8 TFLite graph has a tensor
(export-route.md: TFLite keeps one tensor per op output, fused activations included in the op).
"""

from __future__ import annotations

import operator
from enum import Enum

import torch
import torch.nn.functional as F
from torch import fx, nn


class OpKind(Enum):
    CONV = "conv"  # Conv2d / depthwise Conv2d, fuses a following BN and ReLU/ReLU6
    LINEAR = "linear"  # Linear, fuses a following ReLU/ReLU6
    ADD = "add"  # residual add, fuses a following ReLU/ReLU6
    BN = "bn"  # BatchNorm2d: only valid right after a conv
    RELU = "relu"
    RELU6 = "relu6"
    CAT = "cat"  # same-scale: inputs and output share one range
    AVGPOOL = "avgpool"  # same-scale, re-rounds: output fake-quant with the input's range
    MEAN = "mean"  # global average pooling: its own range (TFLite MEAN requantizes)
    SAME_SCALE = "same_scale"  # max pool, reshape/flatten/view, pad, dropout, identity: grid unchanged
    FIXED = "fixed"  # sigmoid / tanh / softmax: TFLite's fixed output ranges
    NON_TENSOR = "non_tensor"  # size(), getattr, shape arithmetic
    UNSUPPORTED = "unsupported"


_RELU_FNS = {F.relu, torch.relu, torch.relu_}
_RELU6_FNS = {F.relu6}
_ADD_FNS = {operator.add, operator.iadd, torch.add}
_CAT_FNS = {torch.cat, torch.concat}
_SAME_SCALE_FNS = {F.max_pool2d, torch.flatten, torch.reshape, F.dropout, torch.squeeze, torch.unsqueeze}
_SAME_SCALE_METHODS = {"view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_SAME_SCALE_MODULES = (nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Dropout2d, nn.Identity)
_FIXED = {
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh",
    torch.softmax: "softmax", F.softmax: "softmax",
}
_FIXED_METHODS = {"sigmoid": "sigmoid", "tanh": "tanh", "softmax": "softmax"}
_FIXED_MODULES = ((nn.Sigmoid, "sigmoid"), (nn.Tanh, "tanh"), (nn.Softmax, "softmax"))
_SPATIAL_DIMS = ({2, 3}, {-1, -2}, {2, -1}, {-2, 3})


def module_path(gm: fx.GraphModule, node: fx.Node) -> str:
    """The module path a node belongs to: its target for call_module, else the enclosing module."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] if isinstance(v, tuple) else k for k, v in stack.items()]
    return paths[-1] if paths else "<top>"


def describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """Human description of a node's op: the module class or the function name."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return node.op


def _is_tensor(node) -> bool:
    return isinstance(node, fx.Node) and "tensor_meta" in node.meta and hasattr(node.meta["tensor_meta"], "shape")


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _is_relu6_clamp(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is F.hardtanh:
        return _arg(node, 1, "min_val", -1.0) == 0 and _arg(node, 2, "max_val", 1.0) == 6
    is_clamp = (node.op == "call_function" and node.target in (torch.clamp, torch.clip)) or (
        node.op == "call_method" and node.target in ("clamp", "clamp_", "clip"))
    return is_clamp and _arg(node, 1, "min") == 0 and _arg(node, 2, "max") == 6


def _is_global_mean(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        return _arg(node, 1, "output_size") in (1, (1, 1), [1, 1])
    is_mean = node.op == "call_function" and node.target is torch.mean
    if is_mean or (node.op == "call_method" and node.target == "mean"):
        dims = _arg(node, 1, "dim")
        dims = {dims} if isinstance(dims, int) else set(dims or ())
        return dims in _SPATIAL_DIMS
    return False


def classify(gm: fx.GraphModule, node: fx.Node) -> tuple[OpKind, str]:
    """(kind, detail) of a call node; detail names the fixed-range function or why it is unsupported."""
    if not _is_tensor(node):
        return OpKind.NON_TENSOR, ""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.Conv2d):
            if m.groups == 1 or (m.groups == m.in_channels and m.out_channels % m.in_channels == 0):
                return OpKind.CONV, ""
            return OpKind.UNSUPPORTED, (
                f"grouped convolution (groups={m.groups}, in={m.in_channels}) has no TFLite/EdgeTPU int8 kernel; "
                "use groups=1 or depthwise (groups == in_channels)")
        if isinstance(m, nn.Linear):
            return OpKind.LINEAR, ""
        if isinstance(m, nn.BatchNorm2d):
            return OpKind.BN, ""
        if isinstance(m, nn.ReLU):
            return OpKind.RELU, ""
        if isinstance(m, nn.ReLU6) or (isinstance(m, nn.Hardtanh) and m.min_val == 0 and m.max_val == 6):
            return OpKind.RELU6, ""
        if isinstance(m, nn.AvgPool2d):
            return OpKind.AVGPOOL, ""
        if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
            return OpKind.MEAN, ""
        if isinstance(m, _SAME_SCALE_MODULES):
            return OpKind.SAME_SCALE, ""
        for cls, name in _FIXED_MODULES:
            if isinstance(m, cls):
                return OpKind.FIXED, name
        return OpKind.UNSUPPORTED, f"{type(m).__name__} has no quantized form in xqat"
    if node.op == "call_function":
        t = node.target
        if t in _RELU_FNS:
            return OpKind.RELU, ""
        if t in _RELU6_FNS or _is_relu6_clamp(node):
            return OpKind.RELU6, ""
        if t in _ADD_FNS:
            if all(_is_tensor(a) for a in node.args[:2]) and "alpha" not in node.kwargs:
                return OpKind.ADD, ""
            return OpKind.UNSUPPORTED, "add of a tensor and a constant has no fake-quant placement in xqat yet"
        if t in _CAT_FNS:
            return OpKind.CAT, ""
        if t is F.avg_pool2d:
            return OpKind.AVGPOOL, ""
        if _is_global_mean(node):
            return OpKind.MEAN, ""
        if t is F.pad:
            mode, value = _arg(node, 2, "mode", "constant"), _arg(node, 3, "value", None)
            if mode == "constant" and not value:
                return OpKind.SAME_SCALE, ""
            return OpKind.UNSUPPORTED, f"F.pad(mode={mode!r}, value={value!r}): only zero constant padding maps to PAD"
        if t in _SAME_SCALE_FNS:
            return OpKind.SAME_SCALE, ""
        if t in _FIXED:
            return OpKind.FIXED, _FIXED[t]
        if t is operator.getitem:
            return OpKind.UNSUPPORTED, "tensor indexing/slicing has no quantized form in xqat yet"
        return OpKind.UNSUPPORTED, f"function {getattr(t, '__name__', t)} has no quantized form in xqat"
    if node.op == "call_method":
        t = node.target
        if t in ("relu", "relu_"):
            return OpKind.RELU, ""
        if _is_relu6_clamp(node):
            return OpKind.RELU6, ""
        if t in ("add", "add_") and all(_is_tensor(a) for a in node.args[:2]) and "alpha" not in node.kwargs:
            return OpKind.ADD, ""
        if _is_global_mean(node):
            return OpKind.MEAN, ""
        if t in _SAME_SCALE_METHODS:
            return OpKind.SAME_SCALE, ""
        if t in _FIXED_METHODS:
            return OpKind.FIXED, _FIXED_METHODS[t]
        return OpKind.UNSUPPORTED, f"Tensor.{t} has no quantized form in xqat"
    return OpKind.UNSUPPORTED, f"{node.op} nodes are not supported"


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The tensor-valued input nodes of a node, flattening list arguments (torch.cat)."""
    out: list[fx.Node] = []
    for a in node.args:
        items = a if isinstance(a, (list, tuple)) else [a]
        out += [x for x in items if _is_tensor(x)]
    return out
