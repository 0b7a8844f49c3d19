"""What an ONNX model's Q/DQ pairs ask for, read from the ONNX alone (no onnx2tf, no TensorFlow).

* activation Q->DQ -> ``ActivationQ``: the per-tensor (scale, zero point) and the float32 FakeQuant range
  (min, max) = ``canonical_range(scale, zero point)`` whose TF nudge and TFLite converter grid are exactly it;
* Conv / Gemm weight Q->DQ -> ``WeightQ``: int8 codes, symmetric scales and per-channel narrow-range
  FakeQuant ranges (docs/numerics.md, converter qparams & snapping).

``analyze_qdq`` runs before the slow conversion, so bad input fails with a clear error naming the tensor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from ..errors import ExportError
from ..tflite.qtypes import QRANGE, int8_zero_point
from ..torch_side.qparams import canonical_range, nudge_numpy, quant_bounds, tflite_qparams
from .onnx_fold import onnx_constants

__all__ = ["ActivationQ", "WeightQ", "QDQPlan", "analyze_qdq", "weight_converter_scales"]

_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm")  # the ops whose constant weight input (1) is quantized



# --------------------------------------------------------------------------------------------------
# What the ONNX model asks for (pure ONNX; no onnx2tf, no TensorFlow)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivationQ:
    """One per-tensor activation Q->DQ pair and the FakeQuant range that reproduces it."""

    name: str  # ONNX tensor name of the DequantizeLinear output
    source: str  # the float tensor the QuantizeLinear reads
    scale: float  # float32 value from the ONNX
    zero_point: int  # as stored in the ONNX (int8 or uint8 value)
    onnx_dtype: str  # "int8" | "uint8"
    # float32 range whose nudge and converter grid are (scale, zero point), docs/numerics.md#converter-qparams
    fq_min: float
    fq_max: float
    layer: str  # name of the Keras FakeQuant layer that carries it

    @property
    def zero_point_int8(self) -> int:
        """The zero point an int8 .tflite stores for this tensor (uint8 zp - 128, docs/numerics.md#int8-tensors)."""
        return int8_zero_point(self.zero_point) if self.onnx_dtype == "uint8" else self.zero_point

    @property
    def converter_scale(self) -> float:
        """The converter's unrounded double scale (max - min) / 255; float32 of it is `scale`
        (docs/numerics.md#converter-qparams)."""
        return (float(self.fq_max) - float(self.fq_min)) / 255.0


@dataclass(frozen=True)
class WeightQ:
    """One quantized Conv / Gemm weight: its int8 codes and symmetric scales as the ONNX defines them."""

    name: str  # ONNX name of the weight initializer
    dq_output: str  # ONNX name of the DequantizeLinear output the op reads
    consumers: tuple[str, ...]  # ONNX node names of the Conv / Gemm nodes using it
    kind: str  # "conv" | "depthwise" | "tconv" (ConvTranspose, [I, O, kh, kw]) | "fc"
    scales: np.ndarray  # float32, one per output channel (per-tensor scales are repeated)
    per_channel: bool  # the ONNX Q/DQ was per-axis (axis 0)
    codes: np.ndarray  # int8 codes in ONNX layout (Conv: [O, I, kh, kw], Gemm: as stored)
    # float32 per-channel narrow-range FakeQuant range (canonical, docs/numerics.md#converter-qparams)
    fq_min: np.ndarray
    fq_max: np.ndarray
    bias: str | None  # ONNX name of the float bias initializer, if any
    layer: str  # name of the Keras FakeQuant layer that carries it
    gemm_trans_b: bool = False
    input_activation: str | None = None  # activation DQ output feeding the op (its scale x ours = bias scale)

    @property
    def converter_scales(self) -> np.ndarray:
        """The converter's unrounded double scales (max - min) / 254 per channel
        (docs/numerics.md#converter-qparams)."""
        return (self.fq_max.astype(np.float64) - self.fq_min.astype(np.float64)) / 254.0

    def bias_scales(self, input_scale_double: float) -> np.ndarray:
        """int32 bias scales the converter stores: float32(s_in * s_w) of its *double* scales (docs/numerics.md#bias);
        up to 1 float32 ulp away from float32(s_in * s_w) of the rounded float32 scales."""
        return (np.float64(input_scale_double) * self.converter_scales).astype(np.float32)

    @property
    def dequantized(self) -> np.ndarray:
        """codes * scale in float32, exactly what ONNX DequantizeLinear (zero point 0) returns."""
        if self.kind == "tconv":  # ConvTranspose [I, O, kh, kw]: channels on axis 1
            s = self.scales.reshape(1, -1, 1, 1)
        elif self.kind == "fc" and not self.gemm_trans_b:  # Gemm B as [in, out]: channels on axis 1
            s = self.scales.reshape(1, -1)
        else:  # Conv [O, I, kh, kw], Gemm B as [out, in]: channels on axis 0
            s = self.scales.reshape([-1] + [1] * (self.codes.ndim - 1))
        return (self.codes.astype(np.float32) * s).astype(np.float32)


@dataclass(frozen=True)
class QDQPlan:
    """All Q/DQ pairs of a model, keyed by the DequantizeLinear output name."""

    activations: dict[str, ActivationQ]
    weights: dict[str, WeightQ]  # keyed by dq_output
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    q_outputs: dict[str, str] = field(default_factory=dict)  # activation Q output -> DQ output

    @property
    def is_float(self) -> bool:
        """No Q/DQ at all: a float model, converted with onnx2tf's own handlers (for baselines)."""
        return not self.activations and not self.weights

    @property
    def weights_by_name(self) -> dict[str, WeightQ]:
        return {w.name: w for w in self.weights.values()}



def _onnx_int_dtype(arr: np.ndarray, where: str) -> str:
    if arr.dtype == np.int8:
        return "int8"
    if arr.dtype == np.uint8:
        return "uint8"
    raise ExportError(f"{where}: zero point has dtype {arr.dtype}; xqat exports 8-bit Q/DQ only "
                      "(int8 or uint8 zero points)")


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _qparams(node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, str]:
    """(scale float32, zero point, dtype) of a Q or DQ node; both must be constants."""
    where = f"{node.op_type} '{node.name}' (output '{node.output[0]}')"
    if len(node.input) < 2 or node.input[1] not in consts:
        raise ExportError(f"{where}: its scale is not a constant; export the model in eval mode with "
                          "fixed (frozen) quantization ranges")
    scale = np.asarray(consts[node.input[1]])
    if len(node.input) < 3 or not node.input[2]:
        zp = np.zeros(scale.shape, np.uint8)  # ONNX default: uint8 zero point 0
    elif node.input[2] not in consts:
        raise ExportError(f"{where}: its zero point is not a constant; export with frozen ranges")
    else:
        zp = np.asarray(consts[node.input[2]])
    dtype = _onnx_int_dtype(zp, where)
    if scale.dtype != np.float32:
        raise ExportError(f"{where}: scale has dtype {scale.dtype}; float32 expected")
    if not np.all(np.isfinite(scale)):
        raise ExportError(f"{where}: scale contains NaN/Inf ({scale.ravel()[:4]}...); the quantization "
                          "range was never trained or diverged — recalibrate before exporting")
    if np.any(scale <= 0):
        raise ExportError(f"{where}: scale must be > 0, got {scale.ravel()[:4]}; the range is empty "
                          "(min == max): calibrate or train the ranges before exporting")
    return scale.astype(np.float32), zp, dtype


def analyze_qdq(model: onnx.ModelProto) -> QDQPlan:
    """Read every QuantizeLinear->DequantizeLinear pair and derive the FakeQuant ranges
    (docs/numerics.md#converter-qparams).

    Raises ExportError, naming the node or tensor, for anything the TFLite route cannot carry
    exactly: per-axis activations, non-constant ranges, 16-bit types, weights that are not
    symmetric int8 in [-127, 127], float (unquantized) Conv/Gemm weights, NaN/Inf.
    """
    g = model.graph
    consts = onnx_constants(model)
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in g.node:
        for i, x in enumerate(n.input):
            consumers.setdefault(x, []).append((n, i))
    graph_outputs = {o.name for o in g.output}
    initializer_names = {i.name for i in g.initializer}
    inputs = tuple(i.name for i in g.input if i.name not in initializer_names)

    activations: dict[str, ActivationQ] = {}
    weights: dict[str, WeightQ] = {}
    q_outputs: dict[str, str] = {}
    for n in g.node:
        if n.op_type == "QuantizeLinear":
            users = consumers.get(n.output[0], [])
            bad = [u.op_type for u, _ in users if u.op_type != "DequantizeLinear"]
            if bad or n.output[0] in graph_outputs:
                raise ExportError(
                    f"QuantizeLinear '{n.name}' (output '{n.output[0]}') feeds {bad or 'the graph output'}; "
                    "xqat expects every QuantizeLinear to feed DequantizeLinear nodes only (Q->DQ pairs)")
    for n in g.node:
        if n.op_type != "DequantizeLinear":
            continue
        users = consumers.get(n.output[0], [])
        if not users and n.output[0] not in graph_outputs:
            continue  # dead code
        where = f"DequantizeLinear '{n.name}' (output '{n.output[0]}')"
        scale, zp, dtype = _qparams(n, consts)
        q = producer.get(n.input[0])
        weight_users = [(u, i) for u, i in users if u.op_type in _WEIGHT_OPS and i == 1]
        if q is not None and q.op_type == "QuantizeLinear":
            q_scale, q_zp, q_dtype = _qparams(q, consts)
            if (q_dtype != dtype or q_scale.shape != scale.shape or not np.array_equal(q_scale, scale)
                    or not np.array_equal(q_zp, zp)):
                raise ExportError(f"{where}: its scale/zero point differ from those of QuantizeLinear "
                                  f"'{q.name}'; a Q->DQ pair must share one (scale, zero point)")
            src = q.input[0]
            if src in consts:
                codes = _quantize_linear(consts[src], scale, zp, _attrs(q).get("axis", 1), where)
            else:
                act = _activation(n, src, scale, zp, dtype, where, weight_users, len(activations))
                activations[act.name] = act
                q_outputs[q.output[0]] = act.name
                continue
        elif n.input[0] in consts and consts[n.input[0]].dtype in (np.int8, np.uint8):
            src = n.input[0]  # weight stored already quantized: DQ(int8 initializer)
            codes = consts[src]
        else:
            raise ExportError(f"{where} is not fed by a QuantizeLinear; xqat expects QuantizeLinear->"
                              "DequantizeLinear pairs on activations and on float weights")
        weights[n.output[0]] = _weight(n, src, consts, codes, scale, zp, users, where, len(weights))

    for n in g.node:  # every Conv / Gemm needs a quantized weight, or the converter invents one
        if n.op_type in _WEIGHT_OPS and n.input[1] not in weights and (activations or weights):
            raise ExportError(f"{n.op_type} '{n.name}': its weight '{n.input[1]}' has no QuantizeLinear->"
                              "DequantizeLinear; the converter would pick its own weight scales. Export the "
                              "model from prepare_qat so every weight carries its learned range")
        if n.op_type in _WEIGHT_OPS and len(n.input) > 2 and n.input[2] in consts:
            b = consts[n.input[2]]
            if not np.all(np.isfinite(b)):
                raise ExportError(f"{n.op_type} '{n.name}': bias '{n.input[2]}' contains NaN/Inf")
    for k, w in weights.items():
        weights[k] = dataclasses.replace(w, input_activation=_input_activation(
            next(n for n in g.node if n.name == w.consumers[0]).input[0], producer, activations))
    return QDQPlan(activations, weights, inputs, tuple(o.name for o in g.output), q_outputs)


def _input_activation(name: str, producer: dict[str, onnx.NodeProto], activations: dict) -> str | None:
    """The activation DQ output a tensor is, looking through ops that keep the scale (Flatten, Reshape...)."""
    for _ in range(8):
        if name in activations:
            return name
        node = producer.get(name)
        if node is None or node.op_type not in ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity"):
            return None
        name = node.input[0]
    return None


def _activation(n, src, scale, zp, dtype, where, weight_users, index) -> ActivationQ:
    if weight_users:
        raise ExportError(f"{where} feeds the weight input of '{weight_users[0][0].name}' but quantizes the "
                          f"non-constant tensor '{src}'; weights must be constant initializers")
    if scale.size != 1:
        raise ExportError(f"{where}: per-axis quantization of the activation '{src}' is not supported by "
                          "TFLite; use one per-tensor range")
    s, z = np.float32(scale.reshape(-1)[0]), int(zp.reshape(-1)[0])
    qmin, _ = QRANGE[dtype]
    zp_unsigned = z - qmin  # TF FakeQuant works in the unsigned code space [0, 255]
    rng = canonical_range(float(s), zp_unsigned, 8, False)
    if rng is None:
        raise ExportError(f"{where}: no float32 FakeQuant range gives both TF and the TFLite converter the "
                          f"grid (scale={float(s)!r}, zero_point={z}); export the ranges through "
                          "xqat.torch_side.qparams.snap_range (docs/numerics.md#converter-qparams)")
    return ActivationQ(n.output[0], src, float(s), z, dtype, rng[0], rng[1], f"xqat_fq_{index}")


def _quantize_linear(w: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int, where: str) -> np.ndarray:
    """ONNX QuantizeLinear of a constant: saturate(round_half_even(w / scale) + zp), float32 (as ORT)."""
    if w.dtype != np.float32:
        raise ExportError(f"{where}: weight has dtype {w.dtype}; float32 expected")
    if not np.all(np.isfinite(w)):
        raise ExportError(f"{where}: the weight contains NaN/Inf; fix the model (training diverged?)")
    shape = [1] * w.ndim
    if scale.size > 1:
        shape[axis % w.ndim] = -1
    qmin, qmax = QRANGE["int8" if zp.dtype == np.int8 else "uint8"]
    q = np.rint(w / scale.reshape(shape)) + zp.astype(np.float32).reshape(shape if zp.size > 1 else [])
    return np.clip(q, qmin, qmax).astype(zp.dtype)


def _canonical_ranges(scales: np.ndarray, zero_point: int, narrow_range: bool):
    """`canonical_range` for many scales at once: (min, max, channels without a range).

    canonical_range tries the grid ends (qmin - zp)·s, (qmax - zp)·s first; where both formulas already
    agree on those (nearly always) they are its answer, checked here in one vectorized pass with the same
    two formulas. Only the other channels go through its search.
    """
    qmin, qmax = quant_bounds(8, narrow_range)
    s = scales.astype(np.float32)
    lo = (np.float32(qmin - zero_point) * s).astype(np.float32)
    hi = (np.float32(qmax - zero_point) * s).astype(np.float32)
    tf_scale, tf_zp, _, _ = nudge_numpy(lo, hi, 8, narrow_range)
    conv = tflite_qparams(lo, hi, 8, narrow_range)
    ok = (tf_scale == s) & (tf_zp == zero_point) & (conv.scale == s) & (conv.zero_point == zero_point)
    bad = []
    for c in np.flatnonzero(~ok):
        rng = canonical_range(float(s[c]), zero_point, 8, narrow_range)
        if rng is None:
            bad.append(int(c))
        else:
            lo[c], hi[c] = rng
    return lo, hi, bad


def weight_converter_scales(scales: np.ndarray, where: str) -> np.ndarray:
    """The converter's double per-channel scales (max - min) / 254 of the canonical narrow-range FakeQuant ranges
    the export writes for float32 weight `scales` (`WeightQ.converter_scales`; the int32 bias scale is
    float32(s_in * this), docs/numerics.md#bias)."""
    lo, hi, bad = _canonical_ranges(np.atleast_1d(np.asarray(scales, np.float32)), 128, narrow_range=True)
    if bad:
        raise ExportError(f"{where}: weight channel {bad[0]}: no float32 range gives TF and the converter the scale "
                          f"{float(np.atleast_1d(scales)[bad[0]])!r} (docs/numerics.md#converter-qparams)")
    return (hi.astype(np.float64) - lo.astype(np.float64)) / 254.0


def _weight(n, src, consts, codes, scale, zp, users, where, index) -> WeightQ:
    if not users or any(u.op_type not in _WEIGHT_OPS or i != 1 for u, i in users):
        bad = sorted({f"{u.op_type} '{u.name}' (input {i})" for u, i in users})
        raise ExportError(f"{where} dequantizes the constant '{src}' for {bad or 'nothing'}; xqat quantizes "
                          "constants only as the weight input of Conv or Gemm")
    ops = {u.op_type for u, _ in users}
    if len(ops) > 1:
        raise ExportError(f"{where}: weight '{src}' is shared by Conv and Gemm nodes; not supported")
    if zp.dtype != np.int8 or np.any(zp != 0):
        raise ExportError(f"{where}: weight '{src}' must be symmetric int8 (zero point 0), got zero point "
                          f"{zp.ravel()[:4]} ({zp.dtype}); TFLite int8 weights are symmetric "
                          "(docs/numerics.md#weights)")
    if np.any(codes == -128):
        raise ExportError(f"{where}: weight '{src}' has int8 code -128; TFLite needs narrow-range weights in "
                          "[-127, 127]: clamp the weight to ±127·scale before exporting (docs/numerics.md#weights)")
    user = users[0][0]
    attrs = _attrs(user)
    axis = _attrs(n).get("axis", 1)
    per_channel = scale.size > 1
    if user.op_type == "Conv":
        if codes.ndim not in (3, 4):
            raise ExportError(f"Conv '{user.name}': only 1-D and 2-D convolutions are supported (weight '{src}' "
                              f"has shape {list(codes.shape)})")
        group = int(attrs.get("group", 1))
        depthwise = group > 1 and codes.shape[1] == 1
        if group > 1 and not depthwise:
            raise ExportError(f"Conv '{user.name}': grouped convolution (group={group}) is neither a normal nor a "
                              "depthwise convolution; TFLite/EdgeTPU have no kernel for it")
        strides = attrs.get("strides", [1, 1])
        if depthwise and len(set(strides)) != 1:
            raise ExportError(f"Conv '{user.name}': depthwise convolution with unequal strides {strides} is "
                              "not supported by onnx2tf's depthwise path")
        kind = "depthwise" if depthwise else "conv"
        out_ch = codes.shape[0]
        if per_channel and (axis % codes.ndim != 0 or scale.size != out_ch):
            raise ExportError(f"{where}: Conv weight '{src}' must be quantized per output channel (axis 0, "
                              f"{out_ch} scales); got axis={axis} with {scale.size} scales")
    elif user.op_type == "ConvTranspose":
        if codes.ndim != 4 or int(attrs.get("group", 1)) != 1:
            raise ExportError(f"ConvTranspose '{user.name}': only 2-D transposed convolutions with group=1 have an "
                              f"int8 TRANSPOSE_CONV kernel (weight '{src}' shape {list(codes.shape)})")
        kind, out_ch = "tconv", codes.shape[1]
        if per_channel and (axis % 4 != 1 or scale.size != out_ch):
            raise ExportError(f"{where}: ConvTranspose weight '{src}' must be quantized per output channel (axis 1, "
                              f"{out_ch} scales); got axis={axis} with {scale.size} scales")
    else:
        if int(attrs.get("transA", 0)) or float(attrs.get("alpha", 1.0)) != 1.0 \
                or float(attrs.get("beta", 1.0)) != 1.0:
            raise ExportError(f"Gemm '{user.name}': only transA=0, alpha=1, beta=1 (torch.nn.Linear) is "
                              "supported")
        if per_channel:
            raise ExportError(f"{where}: Gemm (Linear) weight '{src}' is quantized per channel; the TF 2.21 "
                              "converter fails on per-channel MatMul kernels ('tfl.transpose' op has mismatched "
                              "quantized axes). Quantize Linear weights per tensor (docs/numerics.md#weights)")
        kind = "fc"
        out_ch = codes.shape[0] if int(attrs.get("transB", 0)) else codes.shape[1]
    scales = np.broadcast_to(scale.reshape(-1), (out_ch,)).astype(np.float32) if scale.size == 1 \
        else scale.reshape(-1).astype(np.float32)
    lo, hi, bad = _canonical_ranges(scales, 128, narrow_range=True)  # narrow codes [1, 255]: zero point 128
    if bad:
        raise ExportError(f"{where}: weight '{src}' channel {bad[0]}: no float32 range gives TF and the "
                          f"converter the scale {float(scales[bad[0]])!r}; snap the weight scale "
                          "(docs/numerics.md#converter-qparams)")
    bias = user.input[2] if len(user.input) > 2 and user.input[2] in consts else None
    return WeightQ(src, n.output[0], tuple(u.name for u, _ in users), kind, scales, per_channel,
                   codes.astype(np.int8), lo, hi, bias, f"xqat_wfq_{index}",
                   bool(int(attrs.get("transB", 0))) if kind == "fc" else False)
