"""What each torch.fx node computes, in quantization terms: the op vocabulary `prepare_qat` understands.

Every node maps to one `OpKind`, recognised by what it computes (a module, its functional form or the
Tensor method alike); the kind decides fusion and whether the int8 TFLite graph has a tensor after it
(TFLite keeps one tensor per op output, fused activations included in the op; see docs/numerics.md).
Shape-dependent decisions (an op that folds away at the example's shape) are taken here too.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from enum import Enum, StrEnum

import torch
import torch.nn.functional as F
from torch import fx, nn

from .decomposed import (
    MAX_GATHERED_KERNEL,
    adaptive_pool_axis,
    adaptive_pool_windows,
    constant_like,
    converter_constant,
    gather_rows,
    hardsigmoid_relu6,
    hardsigmoid_scale,
    rsqrt,
)
from .recurrent import RECURRENT, recurrent_problem


class OpKind(Enum):
    CONV = "conv"  # Conv1d/Conv2d/depthwise/ConvTranspose2d: fuses a following BN and ReLU/ReLU6
    GROUPED_CONV = "grouped_conv"  # split into per-group convs + concat before planning
    LINEAR = "linear"  # Linear: fuses a following ReLU/ReLU6
    ADD = "add"  # add of two tensors: fuses a following ReLU/ReLU6
    MUL = "mul"  # mul of two tensors (SE gates, SiLU's x*sigmoid(x)): its own range
    SUB = "sub"  # difference of two tensors (a GRU's h - n): its own range
    MATMUL = "matmul"  # product of two activations (attention scores, attention x values): BATCH_MATMUL, own range
    RECURRENT = "recurrent"  # nn.LSTM / nn.GRU: unrolled into the ops above before planning (recurrent.py)
    BN = "bn"  # BatchNorm: folded into the conv that feeds it, else a per-channel MUL+ADD of its own
    RELU = "relu"
    RELU6 = "relu6"
    HARDSWISH = "hardswish"  # TFLite HARD_SWISH: its own range
    GELU = "gelu"  # TFLite GELU (exact erf or tanh form, a table over the input codes): its own range
    RSQRT = "rsqrt"  # TFLite RSQRT (LayerNorm's 1/std, decomposed.rsqrt): its own range
    MULTIHEAD_ATTENTION = "multihead_attention"  # nn.MultiheadAttention: written out before planning (transformer.py)
    LAYER_NORM = "layer_norm"  # over the last dim: decomposed into MEAN, SUB, MUL, MEAN, RSQRT, MUL, MUL, ADD
    CONSTANT = "constant"  # a constant operand of ADD/SUB/MUL (decomposed.py): quantized by the converter, no point
    HARDSIGMOID = "hardsigmoid"  # relu6(x + 3) / 6: decomposed into ADD+RELU6 and MUL, fixed grids (decomposed.py)
    SILU = "silu"  # x * sigmoid(x): LOGISTIC (fixed grid) + MUL (own range)
    CAT = "cat"  # same-scale: inputs and output share one range
    AVGPOOL = "avgpool"  # same-scale, re-rounds: output fake-quant with the input's range
    ADAPTIVE_AVGPOOL = "adaptive_avgpool"  # unequal windows: GATHER (H, W) + AVERAGE_POOL_2D, decomposed.py
    RESIZE = "resize"  # bilinear resize: same scale as its input, re-rounds like AVGPOOL
    MEAN = "mean"  # global average pooling: its own range (TFLite MEAN requantizes)
    SAME_SCALE = "same_scale"  # max pool, reshape/flatten/view, pad, slicing, transpose, nearest resize
    PASS_THROUGH = "pass_through"  # identity in eval (Dropout, Identity, DropPath) or folded away: no tensor
    FIXED = "fixed"  # sigmoid / tanh / softmax: TFLite's fixed output ranges
    NON_TENSOR = "non_tensor"  # size(), getattr, shape arithmetic, tuples of tensors (chunk/split)
    UNSUPPORTED = "unsupported"


class FixedGrid(StrEnum):
    """TFLite ops whose int8 output has a fixed grid (see `quantizers.FIXED_RANGES`)."""

    SIGMOID = "sigmoid"
    TANH = "tanh"
    SOFTMAX = "softmax"
    HARDSIGMOID_RELU6 = "hardsigmoid_relu6"  # relu6(x + 3) inside a hard sigmoid: [0, 6]
    HARDSIGMOID = "hardsigmoid"  # [0, 1], codes equal to the [0, 6] grid's before it


Kind = tuple[OpKind, str]  # (kind, detail): the fixed grid's name, or why the op is unsupported
_PASS_THROUGH_NAMES = ("DropPath", "DropBlock2d", "StochasticDepth")  # timm / torchvision regularisers


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


def is_tensor(node) -> bool:
    return isinstance(node, fx.Node) and "tensor_meta" in node.meta and hasattr(node.meta["tensor_meta"], "shape")


def shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["tensor_meta"].shape)


def arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def is_pass_through_module(m: nn.Module) -> bool:
    """Regularisers that are identities in eval: captured as leaf modules so training keeps their behaviour."""
    return isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity)) or \
        type(m).__name__ in _PASS_THROUGH_NAMES


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The tensor-valued input nodes of a node, flattening list arguments (torch.cat); a getitem on a tuple
    of tensors (chunk, split) reads the tensor that was split."""
    out: list[fx.Node] = []
    for a in node.args:
        items = a if isinstance(a, (list, tuple)) else [a]
        for x in items:
            if is_tensor(x):
                out.append(x)
            elif isinstance(x, fx.Node) and x.op != "get_attr" and x.op != "placeholder" and x is node.args[0]:
                out += [y for y in tensor_inputs(x)[:1] if y not in out]  # chunk(x)[i] reads x
    return out


def _same_shape(node: fx.Node) -> bool:
    ins = tensor_inputs(node)
    return bool(ins) and shape(ins[0]) == shape(node)


def _spatial_one(node: fx.Node) -> bool:
    ins = tensor_inputs(node)
    return bool(ins) and len(shape(ins[0])) == 4 and shape(ins[0])[2:] == (1, 1)


CONSTANT_OPERAND = "constant operand"  # detail of ADD/SUB/MUL with a scalar or parameter operand: decompose rewrites it


def _constant_operand(a) -> bool:
    """A Python number or a parameter/buffer (get_attr): an operand `handlers.decompose` turns into a constant."""
    return (isinstance(a, (int, float)) and not isinstance(a, bool)) or (isinstance(a, fx.Node) and a.op == "get_attr")


# -- shape rules (any input size): ops the converter folds away at the example's shape --------------------
FIX = "; fix: "  # an UNSUPPORTED detail may name its own fix after this separator (else: skip is suggested)
FOLDED = "folded"  # PASS_THROUGH detail of an op that is an identity only at this shape (not a regulariser)


def _mean(node: fx.Node) -> Kind:
    """Global average pooling (GlobalAveragePool in ONNX); over a 1x1 map the converter removes it."""
    return (OpKind.PASS_THROUGH, FOLDED) if _spatial_one(node) else (OpKind.MEAN, "")


def _reshape(node: fx.Node) -> Kind:
    return (OpKind.PASS_THROUGH, FOLDED) if _same_shape(node) else (OpKind.SAME_SCALE, "")


def _pool(kind: OpKind) -> Callable[[fx.Node], Kind]:
    """A (max/avg) pool stays an op in TFLite at every shape, even a 1x1 window over a 1x1 map."""
    return lambda node: (kind, "")


def _adaptive_avg(node: fx.Node) -> Kind:
    ins = tensor_inputs(node)
    if not ins or len(shape(ins[0])) != 4:
        return OpKind.UNSUPPORTED, "adaptive average pooling of a tensor that is not 4-D (N, C, H, W)"
    (h, w), (oh, ow) = shape(ins[0])[2:], shape(node)[2:]
    if (oh, ow) == (h, w):
        return OpKind.PASS_THROUGH, FOLDED
    if (oh, ow) == (1, 1):
        return _mean(node)
    if h % oh == 0 and w % ow == 0:
        return OpKind.AVGPOOL, ""
    bad = [(axis, n, m) for axis, n, m in (("H", h, oh), ("W", w, ow)) if adaptive_pool_axis(n, m) is None]
    if not bad:
        return OpKind.ADAPTIVE_AVGPOOL, ""
    axis, n, m = bad[0]
    lengths = sorted({end - start for start, end in adaptive_pool_windows(n, m)})
    return OpKind.UNSUPPORTED, (f"adaptive average pooling {h}x{w} -> {oh}x{ow}: its windows along {axis} are "
                                f"{', '.join(map(str, lengths))} pixels long, whose lcm exceeds "
                                f"{MAX_GATHERED_KERNEL}, the largest kernel of the GATHER + AVERAGE_POOL_2D form that "
                                "computes unequal windows"
                                f"{FIX}use an input size whose map here is a multiple of {oh}x{ow} (e.g. torchvision "
                                "VGG/AlexNet: 224 px), or replace this pool by nn.AdaptiveAvgPool2d(1) and the "
                                "classifier's input size accordingly")


def _interpolate(node: fx.Node, mode: str, align_corners) -> Kind:
    """A resize stays an op in TFLite, also to the same size."""
    if mode == "nearest":
        return OpKind.SAME_SCALE, ""
    if mode == "bilinear":
        return OpKind.RESIZE, ""
    return OpKind.UNSUPPORTED, f"interpolate mode {mode!r}: TFLite resizes only 'nearest' and 'bilinear'"


def _permute(node: fx.Node) -> Kind:
    """A transpose/permute that keeps every dim in place is an identity; any other moves data."""
    rank = len(shape(node))
    if node.target in ("transpose", torch.transpose):
        dims = [d % rank for d in (arg(node, 1, "dim0"), arg(node, 2, "dim1"))]
        identity = dims[0] == dims[1]
    else:
        dims = node.args[1:] if node.op == "call_method" else arg(node, 1, "dims")
        dims = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else list(dims)
        identity = [d % rank for d in dims] == list(range(rank))
        identity = identity or ([d % rank for d in dims] == [0, 2, 3, 1]  # NCHW -> NHWC: TFLite's layout already,
                                and not all(_is_matmul(u) for u in node.users))  # not attention's keys
    return (OpKind.PASS_THROUGH, FOLDED) if identity else (OpKind.SAME_SCALE, "")


def _is_matmul(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (operator.matmul, torch.matmul, torch.bmm)


def _pad(node: fx.Node) -> Kind:
    mode, value = arg(node, 2, "mode", "constant"), arg(node, 3, "value", None)
    if mode != "constant" or value:
        return OpKind.UNSUPPORTED, f"F.pad(mode={mode!r}, value={value!r}): only zero constant padding maps to PAD"
    return _reshape(node)


def _binary(kind: OpKind, name: str) -> Callable[[fx.Node], Kind]:
    def rule(node: fx.Node) -> Kind:
        a = node.args[:2]
        if len(a) == 2 and "alpha" not in node.kwargs:
            if all(is_tensor(x) and x.op != "get_attr" for x in a):
                return kind, ""
            if kind is not OpKind.MATMUL and any(_constant_operand(x) for x in a) and \
                    all(_constant_operand(x) or (is_tensor(x) and x.op != "get_attr") for x in a) and \
                    not all(_constant_operand(x) for x in a):
                return kind, CONSTANT_OPERAND
        return OpKind.UNSUPPORTED, (f"{name} of these operands has no fake-quant placement in xqat; "
                                    "use two tensors, or a tensor and a number or a parameter")
    return rule


def _div(node: fx.Node) -> Kind:
    """x / c by a number is a MUL by 1/c (DIV has no int8 kernel on every backend); x / tensor is refused."""
    divisor = node.args[1] if len(node.args) > 1 else None
    number = isinstance(divisor, (int, float)) and not isinstance(divisor, bool) and divisor != 0
    if number and is_tensor(node.args[0]) and node.args[0].op != "get_attr" and not node.kwargs:
        return OpKind.MUL, CONSTANT_OPERAND
    return OpKind.UNSUPPORTED, (f"division by {divisor!r}: only division by a nonzero number (a MUL by its inverse) "
                                "has an int8 form")


def _gelu(node: fx.Node, approximate: str) -> Kind:
    return (OpKind.GELU, approximate) if approximate in ("none", "tanh") else \
        (OpKind.UNSUPPORTED, f"gelu(approximate={approximate!r})")


def _layer_norm(node: fx.Node, normalized_shape) -> Kind:
    """LayerNorm over the last dim only: TFLite has no int8 LayerNorm, decompose writes its ops."""
    dims = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(dims) == 1 and tensor_inputs(node) and len(shape(tensor_inputs(node)[0])) >= 2:
        return OpKind.LAYER_NORM, ""
    return OpKind.UNSUPPORTED, (f"LayerNorm over {len(dims)} dims {list(dims)}: xqat normalizes over the last dim "
                                f"only{FIX}normalize over the last dim (e.g. permute the features last first)")


def _cat(node: fx.Node) -> Kind:
    tensors = arg(node, 0, "tensors", ())
    return (OpKind.PASS_THROUGH, FOLDED) if len(tensors) == 1 else (OpKind.CAT, "")


def _getitem(node: fx.Node) -> Kind:
    src = node.args[0]
    if is_tensor(src):  # slicing: SLICE / STRIDED_SLICE / GATHER-free indexing
        return _reshape(node)
    return OpKind.SAME_SCALE, ""  # one tensor of chunk/split/unbind: SPLIT keeps the input's grid


def _clamp(node: fx.Node) -> Kind:
    lo, hi = arg(node, 1, "min"), arg(node, 2, "max")
    if node.target is F.hardtanh:
        lo, hi = arg(node, 1, "min_val", -1.0), arg(node, 2, "max_val", 1.0)
    if (lo, hi) == (0, 6):
        return OpKind.RELU6, ""
    if lo == 0 and hi is None:
        return OpKind.RELU, ""
    return OpKind.UNSUPPORTED, f"clamp to [{lo}, {hi}]: only ReLU (min 0) and ReLU6 (0..6) have int8 kernels"


def _const(kind: OpKind, detail: str = "") -> Callable[[fx.Node], Kind]:
    return lambda node: (kind, detail)


def _softmax(node: fx.Node) -> Kind:
    return OpKind.FIXED, FixedGrid.SOFTMAX


# Functions and Tensor methods, by what they compute.
_FUNCTIONS: dict[object, Callable[[fx.Node], Kind]] = {
    F.relu: _const(OpKind.RELU), torch.relu: _const(OpKind.RELU), torch.relu_: _const(OpKind.RELU),
    F.relu6: _const(OpKind.RELU6), F.hardtanh: _clamp, torch.clamp: _clamp, torch.clip: _clamp,
    F.hardswish: _const(OpKind.HARDSWISH), F.silu: _const(OpKind.SILU), F.hardsigmoid: _const(OpKind.HARDSIGMOID),
    operator.add: _binary(OpKind.ADD, "add"), operator.iadd: _binary(OpKind.ADD, "add"),
    torch.add: _binary(OpKind.ADD, "add"), operator.mul: _binary(OpKind.MUL, "mul"),
    operator.imul: _binary(OpKind.MUL, "mul"), torch.mul: _binary(OpKind.MUL, "mul"),
    operator.sub: _binary(OpKind.SUB, "sub"), torch.sub: _binary(OpKind.SUB, "sub"),
    operator.truediv: _div, torch.div: _div, torch.true_divide: _div,
    F.gelu: lambda n: _gelu(n, arg(n, 1, "approximate", "none")),
    F.layer_norm: lambda n: _layer_norm(n, arg(n, 1, "normalized_shape")),
    constant_like: _const(OpKind.CONSTANT), converter_constant: _const(OpKind.CONSTANT), rsqrt: _const(OpKind.RSQRT),
    operator.matmul: _binary(OpKind.MATMUL, "matmul"), torch.matmul: _binary(OpKind.MATMUL, "matmul"),
    torch.bmm: _binary(OpKind.MATMUL, "matmul"),
    torch.cat: _cat, torch.concat: _cat,
    F.avg_pool2d: _pool(OpKind.AVGPOOL), F.max_pool2d: _pool(OpKind.SAME_SCALE),
    F.adaptive_avg_pool2d: _adaptive_avg, torch.mean: lambda n: _mean_rule(n),
    F.pad: _pad, F.interpolate: lambda n: _interpolate(n, arg(n, 3, "mode", "nearest"), arg(n, 4, "align_corners")),
    torch.flatten: _reshape, torch.reshape: _reshape, torch.squeeze: _reshape, torch.unsqueeze: _reshape,
    torch.transpose: _permute, torch.permute: _permute, torch.channel_shuffle: _reshape,
    operator.getitem: _getitem,
    F.dropout: _const(OpKind.PASS_THROUGH), F.dropout2d: _const(OpKind.PASS_THROUGH),
    torch.sigmoid: _const(OpKind.FIXED, FixedGrid.SIGMOID), F.sigmoid: _const(OpKind.FIXED, FixedGrid.SIGMOID),
    torch.tanh: _const(OpKind.FIXED, FixedGrid.TANH), F.tanh: _const(OpKind.FIXED, FixedGrid.TANH),
    torch.softmax: _softmax, F.softmax: _softmax,
    hardsigmoid_relu6: _const(OpKind.FIXED, FixedGrid.HARDSIGMOID_RELU6),
    hardsigmoid_scale: _const(OpKind.FIXED, FixedGrid.HARDSIGMOID),
    gather_rows: _const(OpKind.SAME_SCALE),  # GATHER keeps its input's grid
}
_METHODS: dict[str, Callable[[fx.Node], Kind]] = {
    "relu": _const(OpKind.RELU), "relu_": _const(OpKind.RELU), "clamp": _clamp, "clamp_": _clamp, "clip": _clamp,
    "add": _binary(OpKind.ADD, "add"), "add_": _binary(OpKind.ADD, "add"),
    "mul": _binary(OpKind.MUL, "mul"), "mul_": _binary(OpKind.MUL, "mul"), "sub": _binary(OpKind.SUB, "sub"),
    "div": _div, "truediv": _div,
    "mean": lambda n: _mean_rule(n), "sigmoid": _const(OpKind.FIXED, FixedGrid.SIGMOID),
    "tanh": _const(OpKind.FIXED, FixedGrid.TANH), "softmax": _softmax,
    "permute": _permute, "transpose": _permute,
    **{m: _reshape for m in ("view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze", "view_as",
                             "reshape_as")},
}


def _mean_rule(node: fx.Node) -> Kind:
    dims = arg(node, 1, "dim")
    dims = {dims} if isinstance(dims, int) else set(dims or ())
    rank = len(shape(tensor_inputs(node)[0])) if tensor_inputs(node) else 0
    if rank in (3, 4) and {d % rank for d in dims} == set(range(2, rank)):
        if _same_shape(node):  # keepdim=True over a 1x1 map (timm SE at small inputs): the converter removes it
            return OpKind.PASS_THROUGH, FOLDED
        return OpKind.MEAN, ""  # ReduceMean stays a MEAN in TFLite, also over a 1x1 map (1-D: over time)
    if rank in (2, 3) and dims and 0 not in {d % rank for d in dims}:  # (N, T, F): over time or features
        return OpKind.MEAN, ""
    return OpKind.UNSUPPORTED, ("mean over the batch dim, or over dims of a 4-D tensor other than both spatial ones "
                                "(2, 3), has no placement in xqat yet")


def multihead_attention_problem(m: nn.MultiheadAttention, node: fx.Node) -> str | None:
    """Why xqat cannot write this nn.MultiheadAttention call out (None: it can)."""
    q, k, v = (arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
    if not (q is k is v):
        return "only self-attention (query, key and value the same tensor) is written out"
    if any(arg(node, i, name) is not None for i, name in ((3, "key_padding_mask"), (5, "attn_mask"))) or \
            arg(node, 7, "is_causal", False):
        return "attention masks and is_causal are not supported"
    if not m.batch_first or not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        return "needs batch_first=True, kdim = vdim = embed_dim, add_bias_kv=False and add_zero_attn=False"
    if any(u.op != "call_function" or u.target is not operator.getitem or u.args[1] != 0 for u in node.users):
        return "only the attention output ([0]) can be used, not the attention weights"
    return None


def _conv_module(m: nn.Module) -> Kind:
    if m.groups == 1 or (isinstance(m, nn.Conv2d) and m.groups == m.in_channels
                         and m.out_channels % m.in_channels == 0):
        return OpKind.CONV, ""
    if isinstance(m, (nn.Conv2d, nn.Conv1d)) and isinstance(m.padding, tuple):
        return OpKind.GROUPED_CONV, ""
    return OpKind.UNSUPPORTED, (
        f"grouped {type(m).__name__} (groups={m.groups}, in={m.in_channels}) has no int8 TFLite form in xqat{FIX}"
        "use groups=1, or per-group layers + torch.cat")


# Module classes, in order (first match wins): what their forward computes.
_MODULES: tuple[tuple[type | tuple[type, ...], Callable[[nn.Module, fx.Node], Kind]], ...] = (
    ((nn.Conv2d, nn.Conv1d, nn.ConvTranspose2d), lambda m, n: _conv_module(m)),
    (nn.Linear, lambda m, n: (OpKind.LINEAR, "")),
    ((nn.BatchNorm2d, nn.BatchNorm1d), lambda m, n: (OpKind.BN, "")),
    (nn.ReLU, lambda m, n: (OpKind.RELU, "")),
    (nn.ReLU6, lambda m, n: (OpKind.RELU6, "")),
    (nn.Hardtanh, lambda m, n: (OpKind.RELU6, "") if (m.min_val, m.max_val) == (0, 6) else
     (OpKind.UNSUPPORTED, f"Hardtanh({m.min_val}, {m.max_val}): only ReLU6 (0..6) has an int8 kernel")),
    (nn.Hardswish, lambda m, n: (OpKind.HARDSWISH, "")),
    (nn.Hardsigmoid, lambda m, n: (OpKind.HARDSIGMOID, "")),
    (nn.SiLU, lambda m, n: (OpKind.SILU, "")),
    (nn.GELU, lambda m, n: _gelu(n, m.approximate)),
    (nn.LayerNorm, lambda m, n: _layer_norm(n, m.normalized_shape)),
    (nn.AvgPool2d, lambda m, n: _pool(OpKind.AVGPOOL)(n)),
    (nn.AdaptiveAvgPool2d, lambda m, n: _adaptive_avg(n)),
    (nn.MaxPool2d, lambda m, n: _pool(OpKind.SAME_SCALE)(n)),
    ((nn.Flatten, nn.Unflatten, nn.ChannelShuffle), lambda m, n: _reshape(n)),
    (nn.Upsample, lambda m, n: _interpolate(n, m.mode, m.align_corners)),
    (nn.Sigmoid, lambda m, n: (OpKind.FIXED, FixedGrid.SIGMOID)),
    (nn.Tanh, lambda m, n: (OpKind.FIXED, FixedGrid.TANH)),
    (nn.Softmax, lambda m, n: _softmax(n)),
)


def classify(gm: fx.GraphModule, node: fx.Node) -> Kind:
    """(kind, detail) of a call node; detail names the fixed-range function or why it is unsupported."""
    if node.op == "call_module" and is_pass_through_module(gm.get_submodule(node.target)):
        return OpKind.PASS_THROUGH, ""
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), RECURRENT):  # returns a tuple
        problem = recurrent_problem(gm.get_submodule(node.target), node)
        return (OpKind.UNSUPPORTED, problem + FIX + "see docs/sequence-models.md") if problem else \
            (OpKind.RECURRENT, "")
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.MultiheadAttention):
        problem = multihead_attention_problem(gm.get_submodule(node.target), node)
        return (OpKind.UNSUPPORTED, f"nn.MultiheadAttention: {problem}{FIX}write the attention out (q/k/v Linear, "
                "head reshapes, q @ k.transpose(-2, -1), softmax, @ v, out Linear), as in docs/sequence-models.md") \
            if problem else (OpKind.MULTIHEAD_ATTENTION, "")
    if not is_tensor(node):
        return OpKind.NON_TENSOR, ""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        for types, rule in _MODULES:
            if isinstance(m, types):
                return rule(m, node)
        return OpKind.UNSUPPORTED, f"{type(m).__name__} has no quantized form in xqat"
    if node.op == "call_function":
        rule = _FUNCTIONS.get(node.target)
        if rule is not None:
            return rule(node)
        return OpKind.UNSUPPORTED, f"function {getattr(node.target, '__name__', node.target)} has no quantized form " \
                                   "in xqat"
    if node.op == "call_method":
        rule = _METHODS.get(str(node.target))
        if rule is not None:
            return rule(node)
        return OpKind.UNSUPPORTED, f"Tensor.{node.target} has no quantized form in xqat"
    return OpKind.UNSUPPORTED, f"{node.op} nodes are not supported"
