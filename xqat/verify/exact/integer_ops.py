"""One QAT layer as the one-op TFLite model export would write for it, compiled by the emulator's own kernel
registry (`emulate/kernels.build`): the same kernel rules serve the emulator and exact numerics.

Each builder takes the layer's grids at this moment (`Grid`: the snapped float32 scale and int8 zero point the
.tflite stores, and the converter's double scale that fixes the int32 bias scale) and returns a kernel of
integer codes in TFLite layout (NHWC), batched along dim 0 (docs/numerics.md#exact-training-numerics).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from ...export.qdq_plan import weight_converter_scales
from ...tflite.model import TFLiteModel, TFLiteOp, TFLiteTensor
from ...tflite.qtypes import int8_zero_point
from ...torch_side.modules import QConv2d, QLinear
from ...torch_side.qparams import bias_codes, tflite_qparams
from ..emulate.base import Kernel
from ..emulate.kernels import build
from ..emulate.quantize import float_quantizer
from ..emulate.rounding import INT32_MAX, round_half_away
from ..emulate.rules import rules_for

__all__ = ["Grid", "grid_of", "conv_kernel", "transpose_conv_kernel", "fc_kernel", "op_kernel", "const_grid",
           "input_quantizer", "requantize_kernel", "FUSED"]

FUSED = {None: "NONE", "relu": "RELU", "relu6": "RELU6"}


class Grid(NamedTuple):
    """An int8 tensor's deployed grid: float32 scale, int8 zero point, the converter's double scale."""

    scale: float
    zero_point: int
    converter_scale: float


def grid_of(quantizer) -> Grid:
    """The grid export writes for an activation quantizer now: its snapped range (docs/numerics.md#snapping);
    the converter's double scale is (max - min) / 255 of that range (`ActivationQ.converter_scale`)."""
    r = quantizer.snapped()
    return Grid(float(np.float32(r.scale)), int8_zero_point(r.zero_point), (float(r.max) - float(r.min)) / 255.0)


def _tensor(index: int, name: str, shape: Sequence[int], grid: Grid | None = None, *, dtype: str = "INT8",
            scales=None, data: np.ndarray | None = None, qdim: int = 0) -> TFLiteTensor:
    if grid is not None:
        scales, zps = np.array([grid.scale], np.float32), np.array([grid.zero_point], np.int64)
    elif scales is not None:
        scales = np.atleast_1d(np.asarray(scales, np.float32))
        zps = np.zeros(scales.size, np.int64)
    else:
        scales, zps = np.zeros(0, np.float32), np.zeros(0, np.int64)
    shape = tuple(int(d) for d in shape)
    return TFLiteTensor(index, name, dtype, shape, shape, scales, zps, qdim, data)


def _kernel(name: str, label: str, ins: list[tuple], out: tuple, options: dict, backend: str,
            device: torch.device) -> Kernel:
    """A one-op model: `ins` / `out` are `_tensor` argument tuples (name, shape, grid, kwargs)."""
    tensors = [_tensor(i, *a[:-1], **a[-1]) for i, a in enumerate([*ins, out])]
    op = TFLiteOp(0, name, 1, tuple(range(len(ins))), (len(ins),), options)
    model = TFLiteModel((op,), tuple(tensors), tuple(i for i, t in enumerate(tensors[:-1]) if t.data is None),
                        (len(ins),), 1, f"<layer {label}>")
    return build(op, model, backend, device)


def nhwc(shape: Sequence[int]) -> tuple[int, ...]:
    """A torch shape (batch 1) in TFLite layout: channels last for 4-D."""
    shape = (1, *shape[1:])
    return (shape[0], *shape[2:], shape[1]) if len(shape) == 4 else tuple(shape)


def _bias_codes(bias: torch.Tensor | None, channels: int, s_in: Grid, w_scales: np.ndarray) -> np.ndarray:
    """The converter's int32 bias (`qparams.bias_codes`: its double input and weight scales), clipped to int32."""
    if bias is None:
        return np.zeros(channels, np.int32)
    q, _ = bias_codes(bias, s_in.converter_scale, torch.from_numpy(np.asarray(w_scales, np.float64)))
    return np.clip(q.cpu().numpy(), -INT32_MAX, INT32_MAX).astype(np.int32)


def _weight_codes(wq: torch.Tensor, scales: torch.Tensor, axis: int) -> np.ndarray:
    """The int8 codes of a weight on TF's grid (w / s recovers them exactly, docs/numerics.md#weights)."""
    shape = [1] * wq.dim()
    if scales.numel() > 1:
        shape[axis] = -1
    return torch.round(wq.detach().float() / scales.float().reshape(shape)).cpu().numpy().astype(np.int8)


def _weights(m: QConv2d, label: str, s_in: Grid, fold) -> tuple[np.ndarray, np.ndarray, dict]:
    """A conv's int8 weight codes (output channels on `weight_axis`), float32 scales, and its int32 bias input.
    `fold`: a training step's `BatchFold` (weight codes of FQ(w·γ/σ_mv), scales · σ_mv/σ_B, bias β − μ_B·γ/σ_B)."""
    wq, scales, bias = m.export_weights(None if fold is None else (fold.weight, fold.shift))
    codes = _weight_codes(wq, scales, m.weight_axis)
    s_w = scales.detach().cpu().numpy().astype(np.float32).reshape(-1)
    if fold is None:
        w_conv = weight_converter_scales(s_w, f"layer {label}")
    else:  # a training step's layer is never converted: its float32 scales are the bias scale's factors
        s_w = (s_w * fold.scale.detach().cpu().numpy().astype(np.float32)).astype(np.float32)
        w_conv = s_w.astype(np.float64)
    cout = codes.shape[m.weight_axis]
    bias_in = {"dtype": "INT32", "data": _bias_codes(bias, cout, s_in, w_conv), "qdim": 0,
               "scales": (np.float64(s_in.converter_scale) * w_conv).astype(np.float32)}
    return codes, s_w, bias_in


def conv_kernel(m: QConv2d, label: str, x_shape: Sequence[int], y_shape: Sequence[int], s_in: Grid, s_out: Grid,
                backend: str, device: torch.device, fold=None) -> Kernel:
    """CONV_2D / DEPTHWISE_CONV_2D of a QConv2d (Conv2d, or Conv1d on an [N, 1, W, C] view) on input codes
    already padded with the input zero point (the converter writes torch's padding as SAME or PAD + VALID: the
    same integer sums). `fold`: see `_weights`."""
    codes, s_w, bias_in = _weights(m, label, s_in, fold)
    c = m.conv
    depthwise = m.is_depthwise
    if codes.ndim == 3:  # Conv1d: CONV_2D on an [N, 1, W, C] view (what export writes)
        codes = codes[:, :, None, :]
    filt = codes.transpose(1, 2, 3, 0) if depthwise else codes.transpose(0, 2, 3, 1)  # (1,kh,kw,C*M) / OHWI
    cout = codes.shape[0]
    pad = c._reversed_padding_repeated_twice
    stride, dilation = _pair2d(c.stride), _pair2d(c.dilation)
    if len(x_shape) == 3:
        in_shape = (1, 1, x_shape[2] + pad[0] + pad[1], x_shape[1])
    else:
        in_shape = (1, x_shape[2] + pad[2] + pad[3], x_shape[3] + pad[0] + pad[1], x_shape[1])
    options = {"padding": "VALID", "strideH": stride[0], "strideW": stride[1], "dilationHFactor": dilation[0],
               "dilationWFactor": dilation[1], "fusedActivationFunction": FUSED[m.act]}
    if depthwise:
        options["depthMultiplier"] = cout // c.in_channels
    ins = [("input", in_shape, s_in, {}),
           ("filter", filt.shape, None, {"scales": s_w, "data": filt, "qdim": 3 if depthwise else 0}),
           ("bias", (cout,), None, bias_in)]
    out_shape = nhwc(y_shape) if len(y_shape) == 4 else (1, 1, y_shape[2], y_shape[1])
    return _kernel("DEPTHWISE_CONV_2D" if depthwise else "CONV_2D", label, ins, (label, out_shape, s_out, {}),
                   options, backend, device)


def transpose_conv_kernel(m: QConv2d, label: str, x_shape: Sequence[int], y_shape: Sequence[int], s_in: Grid,
                          s_out: Grid, backend: str, device: torch.device, fold=None) -> Kernel:
    """TRANSPOSE_CONV of a QConv2d around a ConvTranspose2d without padding (what export writes: output shape,
    (O, kh, kw, I) filter, input, int32 bias; VALID, fused activation). The kernel takes the input codes only."""
    codes, s_w, bias_in = _weights(m, label, s_in, fold)
    filt = codes.transpose(1, 2, 3, 0)  # torch (I, O, kh, kw) -> (O, kh, kw, I)
    out_shape = nhwc(y_shape)
    ins = [("output_shape", (4,), None, {"dtype": "INT32", "data": np.array(out_shape, np.int32)}),
           ("filter", filt.shape, None, {"scales": s_w, "data": filt, "qdim": 0}),
           ("input", nhwc(x_shape), s_in, {}),
           ("bias", (filt.shape[0],), None, bias_in)]
    c = m.conv
    options = {"padding": "VALID", "strideH": c.stride[0], "strideW": c.stride[1],
               "fusedActivationFunction": FUSED[m.act]}
    k = _kernel("TRANSPOSE_CONV", label, ins, (label, out_shape, s_out, {}), options, backend, device)
    return lambda xs: k([None, None, xs[0], None])


def _pair2d(v: Sequence[int]) -> tuple[int, int]:
    """A conv's stride / dilation as the (H, W) pair of its CONV_2D (a Conv1d's W is its only dimension)."""
    return (1, int(v[0])) if len(v) == 1 else (int(v[0]), int(v[1]))


def fc_kernel(m: QLinear, label: str, x_shape: Sequence[int], s_in: Grid, s_out: Grid, backend: str,
              device: torch.device) -> Kernel:
    """FULLY_CONNECTED of a QLinear: per-tensor int8 weights (docs/numerics.md#weights), int32 bias."""
    wq, scales, bias = m.export_weights()
    codes = _weight_codes(wq, scales, 0)
    s_w = scales.detach().cpu().numpy().astype(np.float32).reshape(-1)
    w_conv = weight_converter_scales(s_w, f"layer {label}")
    cout, depth = codes.shape
    ins = [("input", (1, depth), s_in, {}), ("weights", codes.shape, None, {"scales": s_w, "data": codes}),
           ("bias", (cout,), None, {"dtype": "INT32", "data": _bias_codes(bias, cout, s_in, w_conv),
                                    "scales": (np.float64(s_in.converter_scale) * w_conv).astype(np.float32)})]
    options = {"fusedActivationFunction": FUSED[m.act], "weightsFormat": 0, "keepNumDims": False}
    return _kernel("FULLY_CONNECTED", label, ins, (label, (1, cout), s_out, {}), options, backend, device)


def op_kernel(name: str, label: str, in_shapes: Sequence[Sequence[int]], s_ins: Sequence[Grid],
              out_shape: Sequence[int], s_out: Grid, options: dict, backend: str, device: torch.device,
              consts: Sequence = ()) -> Kernel:
    """A kernel of int8 activations (ADD, MUL, pools, MEAN, CONCATENATION, LOGISTIC, RESIZE_BILINEAR, ...); shapes
    in TFLite layout. `consts` are constant inputs (after the activations, or at their `position`): INT32 arrays
    (MEAN's axes, a resize's size) or `layers.Const` values the converter quantizes to int8 (`const_grid`; a
    parameter's current value), shaped to the op's rank. The kernel takes the activations only."""
    ins = [(f"input{i}", s, g, {}) for i, (s, g) in enumerate(zip(in_shapes, s_ins))]
    slots: list[int | None] = list(range(len(ins)))  # per op input: the activation it reads, None for a constant
    fixed: list[torch.Tensor | None] = [None] * len(ins)  # what the kernel gets for each constant input
    for i, c in enumerate(consts):
        at = len(ins) if getattr(c, "position", None) is None else c.position
        if getattr(c, "quantized", False):
            data = c.data if c.source is None else c.source.detach().cpu().numpy().astype(np.float32)
            data = data.reshape((1,) * (len(out_shape) - data.ndim) + data.shape)  # the op's rank, as the converter
            g = const_grid(data)
            codes = np.clip(round_half_away(torch.from_numpy(data.astype(np.float64) / g.scale)).numpy()
                            + g.zero_point, -128, 127).astype(np.int8)
            entry, value = (f"const{i}", codes.shape, g, {"data": codes}), torch.from_numpy(codes).to(device)
        else:
            data = np.asarray(getattr(c, "data", c), np.int32)
            entry, value = (f"const{i}", data.shape, None, {"dtype": "INT32", "data": data}), None
        ins.insert(at, entry)
        slots.insert(at, None)
        fixed.insert(at, value)  # elementwise kernels read an int8 constant as an input
    k = _kernel(name, label, ins, (label, out_shape, s_out, {}), options, backend, device)
    if not consts:
        return k
    return lambda xs: k([fixed[j] if a is None else xs[a] for j, a in enumerate(slots)])


def const_grid(data: np.ndarray) -> Grid:
    """The int8 grid the converter gives a float constant operand of an activation op: per tensor, its range
    widened to contain 0, by the converter's double formula (docs/numerics.md#converter-qparams)."""
    lo, hi = min(0.0, float(data.min())), max(0.0, float(data.max()))
    q = tflite_qparams(lo, hi)
    return Grid(float(q.scale), int(q.zero_point_signed), (hi - lo) / 255.0)


def requantize_kernel(label: str, shape: Sequence[int], s_in: Grid, s_out: Grid, backend: str,
                      device: torch.device) -> Kernel:
    """The int8 -> int8 QUANTIZE the converter inserts where a same-scale op's input grid differs from its output's."""
    return op_kernel("QUANTIZE", label, [shape], [s_in], shape, s_out, {}, backend, device)


def input_quantizer(grid: Grid, sample_numel: int, backend: str, device: torch.device):
    """float32 (TFLite layout) -> int8 codes as the interpreter's input QUANTIZE rule on `backend` (the rule
    parity uses to feed the interpreter, `interpreter.quantize_input`)."""
    return float_quantizer(rules_for(backend, "QUANTIZE")["quantize"], grid.scale, grid.zero_point, -128, 127,
                           sample_numel, device)
