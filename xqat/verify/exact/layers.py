"""What each fake-quant point of a QAT model computes on the device: the TFLite op between the point and the points
that feed it, read from the fx graph (`plan_layers`), written as export writes it (op name, options, constant
inputs). Layers outside the supported set are refused, all at once, each named (exact numerics never
approximate, docs/numerics.md#exact-training-numerics)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.utils import _pair

from ...errors import UnsupportedLayerError
from ...torch_side.capture import check_input
from ...torch_side.decomposed import constant_like, converter_constant
from ...torch_side.modules import QAdd, QConv2d, QLinear
from ...torch_side.patterns import FixedGrid, OpKind, arg, classify, describe, is_pass_through_module, tensor_inputs
from ...torch_side.prepare import point_key, point_module

__all__ = ["Layer", "Const", "plan_layers", "SUPPORTED"]

_TFLITE_AXIS_4D = {1: 3, 2: 1, 3: 2}  # NCHW dim -> NHWC axis
_FUSED = {None: "NONE", "relu": "RELU", "relu6": "RELU6"}

# What the refusal lists (kept next to the code that decides it).
SUPPORTED = ("conv / depthwise / grouped conv and Conv1d, Linear, with BN and fused ReLU/ReLU6; add, sub, mul (also "
             "broadcast SE gates); ReLU, ReLU6, hard swish, hard sigmoid, SiLU, sigmoid, tanh, softmax; average / "
             "max / global pooling, mean; bilinear and nearest resize; concat; copies (reshape, flatten, slicing, "
             "chunk/split, transpose, channel shuffle, pad); Identity / Dropout / DropPath; ConvTranspose2d without "
             "padding; Linear on sequences, unrolled LSTM / GRU; LayerNorm over the last dim (MEAN, SUB, MUL, RSQRT, "
             "constant gamma / beta), GELU, add / sub / mul with a number or parameter operand, matmul, softmax "
             "over the last dim of a sequence model's tensors; a LeakyReLU left to the converter (skip)")
_CONSTANTS = (constant_like, converter_constant)


class Const(NamedTuple):
    """A constant input of a device op: INT32 data (MEAN's axes, a resize's size), or a float value the converter
    quantizes to int8 on its own grid (hard sigmoid's 3 and 1/6, x * 0.125, LayerNorm's gamma and beta).
    `source`: a parameter whose current value is the data (read when the kernel is built); `position`: its input
    index in the op (None: after the activations; 0 for c - x)."""

    data: np.ndarray | None
    quantized: bool = False
    source: torch.Tensor | None = None
    position: int | None = None


@dataclass
class Layer:
    """The device op that produces one point's tensor, from the tensors of `inputs` (point keys).

    kind: "input" (the model input's QUANTIZE), "conv", "fc" (weight layers), "copy" (codes copied: max pool,
    reshape, slicing, pad, nearest resize, ...), "op" (any other TFLite op: params op, options, consts and
    `same_grid`: inputs on another grid are requantized first, as the converter does for same-scale ops)."""

    kind: str
    label: str
    inputs: list[str] = field(default_factory=list)  # point keys of the op's tensor inputs
    nodes: list[fx.Node] = field(default_factory=list)  # the graph nodes carrying them
    module: nn.Module | None = None  # QConv2d / QLinear
    params: dict = field(default_factory=dict)
    stochastic: list[nn.Module] = field(default_factory=list)  # Dropout / DropPath between the op and the point


def plan_layers(gm: fx.GraphModule) -> dict[str, Layer]:
    """Point key -> its `Layer`, in graph order; UnsupportedLayerError naming every layer that cannot be computed
    exactly."""
    layers: dict[str, Layer] = {}
    problems: list[str] = []
    sequence = _sequence_layout(gm)
    for node in gm.graph.nodes:
        key = point_key(node)
        if key is None:
            continue
        point = point_module(gm, key)
        anchor, stochastic = _through_pass(gm, node.args[0])
        try:
            layers[key] = _layer(gm, anchor, point, sequence)
            layers[key].stochastic = stochastic
        except _Refused as e:
            problems.append(f"'{point.label}' ({describe(gm, anchor)}): {e}")
    if problems:
        raise UnsupportedLayerError(f"exact numerics cannot compute these layers bit for bit (supported: {SUPPORTED}); "
                                    "keep numerics='tf' for this model:\n  " + "\n  ".join(problems))
    return layers


class _Refused(Exception):
    pass


def _sequence_layout(gm: fx.GraphModule) -> bool:
    """Export keeps every tensor in torch's order (no NHWC view) when a 3-D input feeds no Conv1d
    (`export.onnx_layout.sequence_inputs`): the ops then run on torch's axes (docs/sequence-models.md)."""
    if any(isinstance(m, QConv2d) and isinstance(m.conv, nn.Conv1d) for m in gm.modules()):
        return False
    return any(n.op == "placeholder" and "tensor_meta" in n.meta and len(_shape(n)) == 3 for n in gm.graph.nodes)


def _is_constant(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in _CONSTANTS


def _constants(gm: fx.GraphModule, anchor: fx.Node, rank: int, sequence: bool) -> list[Const]:
    """The constant operands of an ADD/SUB/MUL (`transformer.constant_operands`, LayerNorm's gamma and beta), on
    the converter's int8 grid of them (`integer_ops.const_grid`), shaped as the op's rank."""
    out = []
    for i, a in enumerate(anchor.args[:2]):
        if not _is_constant(a):
            continue
        position = 0 if i == 0 else None
        if a.target is constant_like:
            out.append(Const(np.full((1,) * rank, float(a.args[1]), np.float32), True, position=position))
            continue
        src = a.args[0]
        if not (isinstance(src, fx.Node) and src.op == "get_attr"):
            raise _Refused(f"a constant operand '{a.name}' that is not a parameter of the model")
        param = gm.get_parameter(src.target) if src.target in dict(gm.named_parameters()) \
            else gm.get_buffer(src.target)
        if rank >= 3 and not sequence and param.numel() > 1:
            raise _Refused(f"a parameter operand '{src.target}' of a {rank}-D tensor that export holds channels-last")
        out.append(Const(None, True, param, position))
    return out


def _through_pass(gm: fx.GraphModule, anchor: fx.Node) -> tuple[fx.Node, list[nn.Module]]:
    """The op behind the pass-through nodes (Identity, Dropout, DropPath, ops folded at this shape) that end at a
    point, and the modules among them that are not identities in training."""
    stochastic: list[nn.Module] = []
    while point_key(anchor) is None and anchor.op.startswith("call_") and tensor_inputs(anchor) \
            and classify(gm, anchor)[0] is OpKind.PASS_THROUGH:
        m = gm.get_submodule(anchor.target) if anchor.op == "call_module" else None
        if m is not None and is_pass_through_module(m) and type(m) is not nn.Identity:
            stochastic.append(m)
        anchor = tensor_inputs(anchor)[0]
    return anchor, stochastic


def _inputs(gm: fx.GraphModule, anchor: fx.Node) -> tuple[list[str], list[fx.Node]]:
    keys, nodes = [], []
    for first in tensor_inputs(anchor):
        if _is_constant(first):  # a constant operand: `_constants`
            continue
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


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["tensor_meta"].shape)


def _op(label, keys, nodes, op: str, options: dict | None = None, consts=(), same_grid: bool = False) -> Layer:
    return Layer("op", label, keys, nodes, params={"op": op, "options": options or {}, "consts": list(consts),
                                                  "same_grid": same_grid})


def _layer(gm: fx.GraphModule, anchor: fx.Node, point, sequence: bool) -> Layer:
    layer = _device_op(gm, anchor, point, sequence)
    if sequence and layer.kind == "op":
        layer.params["torch_layout"] = True  # 4-D tensors too: the export keeps torch's axes
    return layer


def _device_op(gm: fx.GraphModule, anchor: fx.Node, point, sequence: bool) -> Layer:
    label = point.label
    if anchor.op == "placeholder" or (anchor.op == "call_function" and anchor.target is check_input):
        return Layer("input", label, nodes=[anchor])
    if point_key(anchor) is not None:  # point -> pass-through -> point: the same codes
        return Layer("copy", label, [point_key(anchor)], [anchor])
    keys, nodes = _inputs(gm, anchor)
    module = gm.get_submodule(anchor.target) if anchor.op == "call_module" else None
    shape = _shape(anchor)
    if isinstance(module, QConv2d):
        c = module.conv
        if type(c) not in (nn.Conv2d, nn.Conv1d, nn.ConvTranspose2d) or c.padding_mode != "zeros":
            raise _Refused(f"{type(c).__name__} (padding_mode {c.padding_mode!r}); only Conv2d / Conv1d with zero "
                           "padding and ConvTranspose2d")
        if isinstance(c, nn.ConvTranspose2d) and (any(c.padding) or any(c.output_padding) or c.groups != 1
                                                  or any(d != 1 for d in c.dilation)):
            raise _Refused("ConvTranspose2d with padding, output_padding, groups or dilation; only the plain "
                           "upsampling form (TRANSPOSE_CONV, VALID)")
        return Layer("conv", label, keys, nodes, module)
    if isinstance(module, QLinear):
        if len(_shape(anchor.args[0])) not in (2, 3):
            raise _Refused("Linear on a tensor of rank > 3")
        return Layer("fc", label, keys, nodes, module)
    with_consts = isinstance(module, QAdd) or anchor.op == "call_function"
    consts = _constants(gm, anchor, len(shape), sequence) if with_consts else []
    if isinstance(module, QAdd):
        if len(keys) + len(consts) != 2:
            raise _Refused("an add of a tensor with itself")
        return _op(label, keys, nodes, "ADD", {"fusedActivationFunction": _FUSED[module.act]}, consts)
    if isinstance(module, nn.LeakyReLU) or anchor.target is F.leaky_relu:  # left to the converter (skip): its op
        slope = module.negative_slope if module is not None else arg(anchor, 1, "negative_slope", 0.01)
        return _op(label, keys, nodes, "LEAKY_RELU", {"alpha": float(slope)})
    kind, detail = classify(gm, anchor)
    if kind is OpKind.SAME_SCALE and point.passthrough:
        # max pool, reshape, flatten, slicing, transpose, nearest resize, pad: the codes are copied, so the float
        # op on grid values gives the device's codes (a padded max pool too: export pads with the lowest code, or
        # with the zero point where that is the lowest code, as torch's -inf)
        return Layer("copy", label, keys, nodes)
    if kind in (OpKind.MUL, OpKind.SUB, OpKind.ADD):
        if len(keys) + len(consts) != 2:
            raise _Refused(f"a {kind.value} with an operand that is neither a tensor nor a constant")
        return _op(label, keys, nodes, kind.name, {"fusedActivationFunction": "NONE"}, consts)
    if kind is OpKind.RSQRT:
        return _op(label, keys, nodes, "RSQRT")
    if kind is OpKind.GELU:
        return _op(label, keys, nodes, "GELU", {"approximate": detail == "tanh"})
    if kind is OpKind.MATMUL:  # k^T folded into adj_y reads the transposed values: adj 0 here
        if not sequence:
            raise _Refused("matmul of tensors export holds channels-last; only in a sequence model (torch's axes)")
        return _op(label, keys, nodes, "BATCH_MATMUL", {"adjX": False, "adjY": False})
    if kind in (OpKind.RELU, OpKind.RELU6, OpKind.HARDSWISH):
        return _op(label, keys, nodes, {OpKind.HARDSWISH: "HARD_SWISH"}.get(kind, kind.name))
    if kind is OpKind.CAT:
        rank = len(shape)
        dim = int(arg(anchor, 1, "dim", 0)) % rank
        if dim == 0:
            raise _Refused("concat along the batch dimension")
        axis = _TFLITE_AXIS_4D[dim] if rank == 4 else dim
        return _op(label, keys, nodes, "CONCATENATION", {"axis": axis, "fusedActivationFunction": "NONE"},
                   same_grid=True)
    if kind is OpKind.FIXED:
        return _fixed(gm, anchor, detail, label, keys, nodes, shape, sequence)
    if kind is OpKind.RESIZE:
        return _resize(gm, anchor, module, label, keys, nodes, shape)
    if kind in (OpKind.AVGPOOL, OpKind.MEAN):
        return _pooling(anchor, module, keys, nodes, label, shape, sequence)
    raise _Refused(f"{kind.value} ops have no exact integer form in xqat yet" + (f" ({detail})" if detail else ""))


def _fixed(gm: fx.GraphModule, anchor: fx.Node, detail: str, label: str, keys, nodes, shape, sequence: bool) -> Layer:
    if detail == FixedGrid.SIGMOID:
        return _op(label, keys, nodes, "LOGISTIC")
    if detail == FixedGrid.TANH:
        return _op(label, keys, nodes, "TANH")
    if detail == FixedGrid.HARDSIGMOID_RELU6:  # relu6(x + 3): ADD of the converter's int8 constant 3, fused RELU6
        return _op(label, keys, nodes, "ADD", {"fusedActivationFunction": "RELU6"},
                   [Const(np.full((1,) * len(shape), 3.0, np.float32), quantized=True)])
    if detail == FixedGrid.HARDSIGMOID:  # x * 1/6: MUL of the converter's int8 constant 1/6
        return _op(label, keys, nodes, "MUL", {"fusedActivationFunction": "NONE"},
                   [Const(np.full((1,) * len(shape), 1.0 / 6.0, np.float32), quantized=True)])
    if detail == FixedGrid.SOFTMAX:
        rank = len(shape)
        dim = arg(anchor, 1, "dim", None)
        if dim is None and anchor.op == "call_module":
            dim = gm.get_submodule(anchor.target).dim
        last = 1 if rank == 4 and not sequence else rank - 1  # SOFTMAX: the last axis of TFLite's layout
        if dim is None or int(dim) % rank != last:
            raise _Refused(f"softmax over dim {dim} of a rank-{rank} tensor; only over channels (4-D) or the last dim")
        return _op(label, keys, nodes, "SOFTMAX", {"beta": 1.0})
    raise _Refused(f"fixed-grid op {detail!r} has no exact integer form in xqat yet")


def _resize(gm: fx.GraphModule, anchor: fx.Node, module, label: str, keys, nodes, shape) -> Layer:
    """Bilinear resize: RESIZE_BILINEAR to the output size; align_corners=False is TF's half-pixel centers."""
    align = module.align_corners if isinstance(module, nn.Upsample) else arg(anchor, 4, "align_corners")
    if len(shape) != 4:
        raise _Refused(f"resize of a rank-{len(shape)} tensor; only 4-D (N, C, H, W)")
    options = {"alignCorners": bool(align), "halfPixelCenters": not align}
    return _op(label, keys, nodes, "RESIZE_BILINEAR", options, [Const(np.array(shape[2:], np.int32))],
               same_grid=True)


def _ceil_changes(ceil: bool, k, s, in_shape, shape) -> bool:
    """ceil_mode adds a partial window here (else the pool is the VALID one: timm's ResNet-D downsample at even
    sizes)."""
    if not ceil:
        return False
    (kh, kw) = _pair(k)
    (sh, sw) = _pair(s) if s not in (None, []) else (kh, kw)
    return tuple(shape[2:]) != ((in_shape[2] - kh) // sh + 1, (in_shape[3] - kw) // sw + 1)


def _pooling(anchor: fx.Node, module: nn.Module | None, keys, nodes, label: str, shape, sequence: bool) -> Layer:
    in_shape = _shape(anchor.args[0])
    adaptive = isinstance(module, nn.AdaptiveAvgPool2d) or anchor.target is F.adaptive_avg_pool2d
    name = anchor.target if isinstance(anchor.target, str) else getattr(anchor.target, "__name__", "")
    if (adaptive and tuple(shape[2:]) == (1, 1)) or name == "mean":
        if adaptive:
            dims, keep = {2, 3}, True
        else:
            d = arg(anchor, 1, "dim")
            dims = {int(v) % len(in_shape) for v in (d if isinstance(d, (list, tuple)) else [d])}
            keep = bool(arg(anchor, 2, "keepdim", False))
        if sequence and len(in_shape) == 3 and 0 not in dims:  # torch's axes (LayerNorm's mean, mean over time)
            return _op(label, keys, nodes, "MEAN", {"keepDims": keep}, [Const(np.array(sorted(dims), np.int32))])
        if len(in_shape) == 3 and dims == {2}:  # over time, (N, C, T): MEAN over axis 1 of TFLite's (N, T, C)
            layer = _op(label, keys, nodes, "MEAN", {"keepDims": keep}, [Const(np.array([1], np.int32))])
            layer.params["channels_last"] = True
            return layer
        if len(in_shape) != 4 or dims != {2, 3}:
            raise _Refused(f"mean over dims {sorted(dims)} of a rank-{len(in_shape)} tensor; only the spatial mean "
                           "of an NCHW or over time of an (N, C, T) tensor")
        return _op(label, keys, nodes, "MEAN", {"keepDims": keep}, [Const(np.array([1, 2], np.int32))])
    if adaptive:  # equal windows (divisible sizes): an AVERAGE_POOL_2D of kernel = stride = in / out
        k = s = (in_shape[2] // shape[2], in_shape[3] // shape[3])
    elif isinstance(module, nn.AvgPool2d):
        k, s, p = module.kernel_size, module.stride, module.padding
        if _pair(p) != (0, 0) or _ceil_changes(module.ceil_mode, k, s, in_shape, shape) or module.divisor_override:
            raise _Refused("average pooling with padding, ceil_mode (where it adds a window) or divisor_override")
    else:
        k, s, p = arg(anchor, 1, "kernel_size"), arg(anchor, 2, "stride"), arg(anchor, 3, "padding", 0)
        if _pair(p) != (0, 0) or _ceil_changes(arg(anchor, 4, "ceil_mode", False), k, s, in_shape, shape) \
                or arg(anchor, 6, "divisor_override"):
            raise _Refused("average pooling with padding, ceil_mode (where it adds a window) or divisor_override")
    (kh, kw) = _pair(k)
    (sh, sw) = _pair(s) if s not in (None, []) else (kh, kw)
    options = {"filterHeight": kh, "filterWidth": kw, "strideH": sh, "strideW": sw, "padding": "VALID",
               "fusedActivationFunction": "NONE"}
    return _op(label, keys, nodes, "AVERAGE_POOL_2D", options, same_grid=True)
