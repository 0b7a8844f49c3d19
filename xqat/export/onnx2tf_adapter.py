"""ONNX Q/DQ -> TF FakeQuant graph through onnx2tf, with xqat's own handlers.

The only module that knows onnx2tf's internals (export-route.md "Mechanics"). Stock onnx2tf drops
every QuantizeLinear->DequantizeLinear pair; for one conversion at a time we replace its handlers:

* activation Q->DQ -> ``fake_quant_with_min_max_vars(x, min, max, 8, narrow_range=False)`` with
  (min, max) = ``canonical_range(scale, zero point)``, so TF's nudge and the TFLite converter both
  reproduce the ONNX grid exactly (tf-quant-semantics.md §1.2, §4.3);
* Conv / Gemm weight Q->DQ -> per-channel (Conv) or per-tensor (Gemm) narrow-range FakeQuant applied
  to the kernel *after* onnx2tf moved it to TF layout, kept as an op in the graph (§4.4).

``analyze_qdq`` reads the Q/DQ pairs from the ONNX model first (no onnx2tf needed), so bad input
fails with a clear error naming the tensor before the slow conversion starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import os
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ExportError, OnnxToTfVersionError
from ..torch_side.qparams import canonical_range, nudge_numpy, quant_bounds, tflite_qparams

__all__ = [
    "ONNX2TF_VERSION",
    "ActivationQ",
    "WeightQ",
    "QDQPlan",
    "ActivationRecord",
    "KerasGraph",
    "analyze_qdq",
    "fold_constants",
    "check_onnx2tf",
    "installed_handlers",
    "installed_state",
    "onnx_to_keras",
]

ONNX2TF_VERSION = "1.28.8"  # the handlers below are written against this release's internals

_QRANGE = {"int8": (-128, 127), "uint8": (0, 255)}


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
    fq_min: float  # float32 range whose nudge and converter grid are (scale, zero point), §4.3
    fq_max: float
    layer: str  # name of the Keras FakeQuant layer that carries it

    @property
    def zero_point_int8(self) -> int:
        """The zero point an int8 .tflite stores for this tensor (uint8 zp - 128, §4.2)."""
        return self.zero_point - 128 if self.onnx_dtype == "uint8" else self.zero_point

    @property
    def converter_scale(self) -> float:
        """The converter's unrounded double scale (max - min) / 255; float32 of it is `scale` (§4.3)."""
        return (float(self.fq_max) - float(self.fq_min)) / 255.0


@dataclass(frozen=True)
class WeightQ:
    """One quantized Conv / Gemm weight: its int8 codes and symmetric scales as the ONNX defines them."""

    name: str  # ONNX name of the weight initializer
    dq_output: str  # ONNX name of the DequantizeLinear output the op reads
    consumers: tuple[str, ...]  # ONNX node names of the Conv / Gemm nodes using it
    kind: str  # "conv" | "depthwise" | "fc"
    scales: np.ndarray  # float32, one per output channel (per-tensor scales are repeated)
    per_channel: bool  # the ONNX Q/DQ was per-axis (axis 0)
    codes: np.ndarray  # int8 codes in ONNX layout (Conv: [O, I, kh, kw], Gemm: as stored)
    fq_min: np.ndarray  # float32 per-channel narrow-range FakeQuant range (canonical, §4.3)
    fq_max: np.ndarray
    bias: str | None  # ONNX name of the float bias initializer, if any
    layer: str  # name of the Keras FakeQuant layer that carries it
    gemm_trans_b: bool = False
    input_activation: str | None = None  # activation DQ output feeding the op (its scale x ours = bias scale)

    @property
    def converter_scales(self) -> np.ndarray:
        """The converter's unrounded double scales (max - min) / 254 per channel (§4.3)."""
        return (self.fq_max.astype(np.float64) - self.fq_min.astype(np.float64)) / 254.0

    def bias_scales(self, input_scale_double: float) -> np.ndarray:
        """int32 bias scales the converter stores: float32(s_in * s_w) of its *double* scales (§4.4);
        up to 1 float32 ulp away from float32(s_in * s_w) of the rounded float32 scales."""
        return (np.float64(input_scale_double) * self.converter_scales).astype(np.float32)

    @property
    def dequantized(self) -> np.ndarray:
        """codes * scale in float32, exactly what ONNX DequantizeLinear (zero point 0) returns."""
        if self.kind == "fc" and not self.gemm_trans_b:  # Gemm B as [in, out]: channels on axis 1
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


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
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
    """Read every QuantizeLinear->DequantizeLinear pair and derive the FakeQuant ranges (§4.3).

    Raises ExportError, naming the node or tensor, for anything the TFLite route cannot carry
    exactly: per-axis activations, non-constant ranges, 16-bit types, weights that are not
    symmetric int8 in [-127, 127], float (unquantized) Conv/Gemm weights, NaN/Inf.
    """
    g = model.graph
    consts = _constants(model)
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
        weight_users = [(u, i) for u, i in users if u.op_type in ("Conv", "Gemm") and i == 1]
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
        if n.op_type in ("Conv", "Gemm") and n.input[1] not in weights and (activations or weights):
            raise ExportError(f"{n.op_type} '{n.name}': its weight '{n.input[1]}' has no QuantizeLinear->"
                              "DequantizeLinear; the converter would pick its own weight scales. Export the "
                              "model from prepare_qat so every weight carries its learned range")
        if n.op_type in ("Conv", "Gemm") and len(n.input) > 2 and n.input[2] in consts:
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
    qmin, _ = _QRANGE[dtype]
    zp_unsigned = z - qmin  # TF FakeQuant works in the unsigned code space [0, 255]
    rng = canonical_range(float(s), zp_unsigned, 8, False)
    if rng is None:
        raise ExportError(f"{where}: no float32 FakeQuant range gives both TF and the TFLite converter the "
                          f"grid (scale={float(s)!r}, zero_point={z}); export the ranges through "
                          "xqat.torch_side.qparams.snap_range (tf-quant-semantics.md §4.3)")
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
    qmin, qmax = (-128, 127) if zp.dtype == np.int8 else (0, 255)
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


def _weight(n, src, consts, codes, scale, zp, users, where, index) -> WeightQ:
    if not users or any(u.op_type not in ("Conv", "Gemm") or i != 1 for u, i in users):
        bad = sorted({f"{u.op_type} '{u.name}' (input {i})" for u, i in users})
        raise ExportError(f"{where} dequantizes the constant '{src}' for {bad or 'nothing'}; xqat quantizes "
                          "constants only as the weight input of Conv or Gemm")
    ops = {u.op_type for u, _ in users}
    if len(ops) > 1:
        raise ExportError(f"{where}: weight '{src}' is shared by Conv and Gemm nodes; not supported")
    if zp.dtype != np.int8 or np.any(zp != 0):
        raise ExportError(f"{where}: weight '{src}' must be symmetric int8 (zero point 0), got zero point "
                          f"{zp.ravel()[:4]} ({zp.dtype}); TFLite int8 weights are symmetric (§4.4)")
    if np.any(codes == -128):
        raise ExportError(f"{where}: weight '{src}' has int8 code -128; TFLite needs narrow-range weights in "
                          "[-127, 127]: clamp the weight to ±127·scale before exporting (§4.4)")
    user = users[0][0]
    attrs = _attrs(user)
    axis = _attrs(n).get("axis", 1)
    per_channel = scale.size > 1
    if user.op_type == "Conv":
        if codes.ndim != 4:
            raise ExportError(f"Conv '{user.name}': only 2-D convolutions are supported (weight '{src}' has "
                              f"shape {list(codes.shape)})")
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
        if per_channel and (axis % 4 != 0 or scale.size != out_ch):
            raise ExportError(f"{where}: Conv weight '{src}' must be quantized per output channel (axis 0, "
                              f"{out_ch} scales); got axis={axis} with {scale.size} scales")
    else:
        if int(attrs.get("transA", 0)) or float(attrs.get("alpha", 1.0)) != 1.0 \
                or float(attrs.get("beta", 1.0)) != 1.0:
            raise ExportError(f"Gemm '{user.name}': only transA=0, alpha=1, beta=1 (torch.nn.Linear) is "
                              "supported")
        if per_channel:
            raise ExportError(f"{where}: Gemm (Linear) weight '{src}' is quantized per channel; the TF 2.21 "
                              "converter fails on per-channel MatMul kernels ('tfl.transpose' op has mismatched "
                              "quantized axes). Quantize Linear weights per tensor (export-route.md)")
        kind = "fc"
        out_ch = codes.shape[0] if int(attrs.get("transB", 0)) else codes.shape[1]
    scales = np.broadcast_to(scale.reshape(-1), (out_ch,)).astype(np.float32) if scale.size == 1 \
        else scale.reshape(-1).astype(np.float32)
    lo, hi, bad = _canonical_ranges(scales, 128, narrow_range=True)  # narrow codes [1, 255]: zero point 128
    if bad:
        raise ExportError(f"{where}: weight '{src}' channel {bad[0]}: no float32 range gives TF and the "
                          f"converter the scale {float(scales[bad[0]])!r}; snap the weight scale (§4.3)")
    bias = user.input[2] if len(user.input) > 2 and user.input[2] in consts else None
    return WeightQ(src, n.output[0], tuple(u.name for u, _ in users), kind, scales, per_channel,
                   codes.astype(np.int8), lo, hi, bias, f"xqat_wfq_{index}",
                   bool(int(attrs.get("transB", 0))) if kind == "fc" else False)


_NEVER_FOLD = {"QuantizeLinear", "DequantizeLinear", "Constant"}


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Evaluate every node whose inputs are all constants (shape arithmetic such as the pads torch
    computes for F.pad) into an initializer, and drop what becomes dead. This is the part of onnxsim
    that onnx2tf's layout handling relies on; onnxsim itself is not run. Q/DQ pairs are kept."""
    from onnx.reference import ReferenceEvaluator

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    consts = _constants(out)
    opsets = list(out.opset_import)
    folded: dict[str, np.ndarray] = {}
    for n in g.node:
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
        return out
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
    return out


# --------------------------------------------------------------------------------------------------
# onnx2tf internals: version check, scoped handler install
# --------------------------------------------------------------------------------------------------

_LOCK = threading.Lock()  # handlers are module globals of onnx2tf: one conversion at a time
_CONVERT_ARGS = ("input_onnx_file_path", "output_folder_path", "not_use_onnxsim", "batch_size",
                 "param_replacement_file", "disable_model_save", "verbosity")


def _import_onnx2tf():
    """Import onnx2tf without letting its import-time side effects (env vars, global RNG seeds) leak."""
    env = {k: os.environ.get(k) for k in ("TF_USE_LEGACY_KERAS", "CUDA_VISIBLE_DEVICES")}
    rng_py, rng_np = random.getstate(), np.random.get_state()
    try:
        import onnx2tf
        import onnx2tf.onnx2tf as impl
        import onnx2tf.ops.Conv as conv
        import onnx2tf.ops.DequantizeLinear as dq
        import onnx2tf.ops.Gemm as gemm
        import onnx2tf.ops.QuantizeLinear as q
    except ImportError as e:
        raise OnnxToTfVersionError(f"cannot import onnx2tf ({e}); install onnx2tf=={ONNX2TF_VERSION} "
                                   "(pinned in pyproject.toml)") from e
    finally:
        _restore_env(env)
        random.setstate(rng_py)
        np.random.set_state(rng_np)
    return onnx2tf, impl, {"QuantizeLinear": q, "DequantizeLinear": dq, "Conv": conv, "Gemm": gemm}


def _restore_env(env: dict[str, str | None]) -> None:
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def check_onnx2tf() -> str:
    """Fail with OnnxToTfVersionError unless onnx2tf is the release the handlers were written for and
    still has every internal they replace. Returns the version."""
    onnx2tf, impl, ops = _import_onnx2tf()
    version = getattr(onnx2tf, "__version__", "unknown")
    if version != ONNX2TF_VERSION:
        raise OnnxToTfVersionError(
            f"onnx2tf {version} is installed, but xqat's Q/DQ handlers are written for onnx2tf "
            f"{ONNX2TF_VERSION}'s internals; install onnx2tf=={ONNX2TF_VERSION} (pinned in pyproject.toml)")
    missing = [f"onnx2tf.ops.{k}.make_node" for k, m in ops.items() if not callable(getattr(m, "make_node", None))]
    if not callable(getattr(ops["Conv"], "get_weights_constant_or_variable", None)):
        missing.append("onnx2tf.ops.Conv.get_weights_constant_or_variable")
    if not callable(getattr(impl, "download_test_image_data", None)):
        missing.append("onnx2tf.onnx2tf.download_test_image_data")
    params = inspect.signature(impl.convert).parameters
    missing += [f"onnx2tf.convert({a}=...)" for a in _CONVERT_ARGS if a not in params]
    try:
        from tf_keras.src import backend as kb

        if not (hasattr(kb, "PER_GRAPH_OBJECT_NAME_UIDS") and hasattr(kb, "OBSERVED_NAMES")):
            missing.append("tf_keras.src.backend.PER_GRAPH_OBJECT_NAME_UIDS/OBSERVED_NAMES")
    except ImportError:
        missing.append("tf_keras.src.backend")
    if missing:
        raise OnnxToTfVersionError(f"onnx2tf {version}: internals that xqat's handlers replace are missing: "
                                   f"{', '.join(missing)}; reinstall onnx2tf=={ONNX2TF_VERSION}")
    return version


@functools.cache
def _layer_classes():
    """Keras layers that emit the FakeQuant ops (built lazily: importing xqat must not import TF)."""
    import tensorflow as tf
    import tf_keras

    class FakeQuantActivation(tf_keras.layers.Layer):
        """FakeQuantWithMinMaxVars(x, min, max, 8 bits, narrow_range=False): one activation Q->DQ."""

        def __init__(self, fq_min: float, fq_max: float, **kw):
            super().__init__(**kw)
            self.fq_min, self.fq_max = float(fq_min), float(fq_max)

        def call(self, x):
            return tf.quantization.fake_quant_with_min_max_vars(
                x, min=self.fq_min, max=self.fq_max, num_bits=8, narrow_range=False)

    class FakeQuantConstant(tf_keras.layers.Layer):
        """FakeQuant of a constant kernel, emitted inside the traced graph so the converter takes the
        weight scales from min/max; an eager call would fold at once and the converter would re-derive
        max|w|/127 scales (export-route.md "Mechanics"). The input only anchors the layer in the model."""

        def __init__(self, values: np.ndarray, fq_min: np.ndarray, fq_max: np.ndarray, per_channel: bool, **kw):
            super().__init__(**kw)
            self.values = np.ascontiguousarray(values, np.float32)
            self.fq_min, self.fq_max = np.asarray(fq_min, np.float32), np.asarray(fq_max, np.float32)
            self.per_channel = per_channel

        def call(self, anchor):
            w = tf.constant(self.values)
            if self.per_channel:  # channel is the last axis of the kernel
                return tf.quantization.fake_quant_with_min_max_vars_per_channel(
                    w, min=tf.constant(self.fq_min), max=tf.constant(self.fq_max), num_bits=8, narrow_range=True)
            return tf.quantization.fake_quant_with_min_max_vars(
                w, min=float(self.fq_min[0]), max=float(self.fq_max[0]), num_bits=8, narrow_range=True)

    return FakeQuantActivation, FakeQuantConstant


@dataclass(frozen=True)
class ActivationRecord:
    """Where the FakeQuant of one activation sits in the Keras model (for the TFLite tensor map)."""

    fq_layer: str  # our FakeQuant layer's name
    producers: tuple[str, ...]  # the layer whose output it reads, then that layer's single-input ancestors
    shape: tuple[int | None, ...]  # static shape of the quantized tensor in the TF graph (NHWC)


def _producer_chain(x, depth: int = 4) -> tuple[str, ...]:
    """Layer that made KerasTensor `x`, then up through single-input layers (for ops the converter drops)."""
    chain: list[str] = []
    while depth > 0 and getattr(x, "_keras_history", None) is not None:
        layer, node_index, _ = x._keras_history
        chain.append(layer.name)
        nodes = getattr(layer, "_inbound_nodes", [])
        ins = list(getattr(nodes[node_index], "keras_inputs", [])) if node_index < len(nodes) else []
        if len(ins) != 1:
            break
        x, depth = ins[0], depth - 1
    return tuple(chain)


class _Handlers:
    """xqat's replacements for onnx2tf's QuantizeLinear, DequantizeLinear, Conv and Gemm handlers."""

    def __init__(self, plan: QDQPlan, originals: dict[str, Any], version: str):
        self.plan = plan
        self.version = version
        self.orig = originals
        self.act_by_sanitized = _sanitized_index(plan.activations)
        self.w_by_sanitized = _sanitized_index(plan.weights)
        self.q_by_sanitized = {_sanitize(k): v for k, v in plan.q_outputs.items()}
        self.activation_records: dict[str, ActivationRecord] = {}
        self.weights_done: set[str] = set()
        self._conv = None  # (WeightQ, anchor) while onnx2tf's Conv handler runs

    # QuantizeLinear: activations become a float pass-through (the FakeQuant goes on the DQ output)
    def quantize_linear(self, *, graph_node, tf_layers_dict, **kw):
        self.orig["QuantizeLinear"](graph_node=graph_node, tf_layers_dict=tf_layers_dict, **kw)
        out = graph_node.outputs[0].name
        if out in self.q_by_sanitized:
            tf_layers_dict[out]["tf_node"] = tf_layers_dict[graph_node.inputs[0].name]["tf_node"]

    def dequantize_linear(self, *, graph_node, tf_layers_dict, **kw):
        self.orig["DequantizeLinear"](graph_node=graph_node, tf_layers_dict=tf_layers_dict, **kw)
        act = self.act_by_sanitized.get(graph_node.outputs[0].name)
        if act is None:
            return  # a weight: the Conv / Gemm handler puts its FakeQuant right in front of the kernel
        x = tf_layers_dict[graph_node.inputs[0].name]["tf_node"]  # Q's float input (pass-through above)
        history = getattr(x, "_keras_history", None)
        if history is None:
            raise ExportError(f"activation '{act.source}' (quantized as '{act.name}') is a constant in the "
                              "TF graph; quantized constants are only supported as Conv/Gemm weights")
        fq_act, _ = _layer_classes()
        y = fq_act(act.fq_min, act.fq_max, name=act.layer)(x)
        tf_layers_dict[graph_node.outputs[0].name]["tf_node"] = y
        self.activation_records[act.name] = ActivationRecord(act.layer, _producer_chain(x), tuple(y.shape))

    def conv(self, *, graph_node, tf_layers_dict, **kw):
        w = self.w_by_sanitized.get(graph_node.inputs[1].name)
        if w is None:
            if self.plan.is_float:  # a float model (baselines): onnx2tf's own handler
                return self.orig["Conv"](graph_node=graph_node, tf_layers_dict=tf_layers_dict, **kw)
            raise ExportError(f"Conv '{graph_node.name}': weight '{graph_node.inputs[1].name}' is not quantized")
        self._conv = [w, tf_layers_dict[graph_node.inputs[0].name]["tf_node"], False]
        try:
            self.orig["Conv"](graph_node=graph_node, tf_layers_dict=tf_layers_dict, **kw)
            if not self._conv[2]:
                raise OnnxToTfVersionError(f"Conv '{graph_node.name}': onnx2tf never fetched the kernel through "
                                           "get_weights_constant_or_variable; its Conv handler changed")
        finally:
            self._conv = None
        self.weights_done.add(w.dq_output)

    def get_weights(self, const_or_var, kernel_size):
        kernel = self.orig["get_weights"](const_or_var=const_or_var, kernel_size=kernel_size)
        if self._conv is None or self._conv[2]:
            return kernel
        w, anchor, _ = self._conv
        hwio = np.transpose(w.dequantized, (2, 3, 1, 0))  # ONNX [O, I, kh, kw] -> TF [kh, kw, I, O]
        got = np.asarray(kernel)
        if got.shape != hwio.shape or not np.array_equal(got, hwio):
            raise OnnxToTfVersionError(
                f"weight '{w.name}': onnx2tf's kernel (shape {list(got.shape)}) is not the ONNX dequantized "
                f"weight in [kh, kw, I, O] layout {list(hwio.shape)}; its Conv handler changed")
        _, fq_const = _layer_classes()
        self._conv[2] = True  # per-channel on the last axis (O; for depthwise [kh, kw, 1, C]: C)
        return fq_const(hwio, w.fq_min, w.fq_max, True, name=w.layer)(anchor)

    def gemm(self, *, graph_node, tf_layers_dict, **kw):
        name = graph_node.inputs[1].name
        w = self.w_by_sanitized.get(name)
        if w is None:
            if self.plan.is_float:
                return self.orig["Gemm"](graph_node=graph_node, tf_layers_dict=tf_layers_dict, **kw)
            raise ExportError(f"Gemm '{graph_node.name}': weight '{name}' is not quantized")
        entry = tf_layers_dict[name]
        got = np.asarray(entry["tf_node"])
        deq = w.dequantized
        if got.shape != deq.shape or not np.array_equal(got, deq):
            raise OnnxToTfVersionError(f"Gemm weight '{w.name}': onnx2tf's dequantized value differs from the "
                                       "ONNX one; its DequantizeLinear handler changed")
        kernel = deq.T if w.gemm_trans_b else deq  # [in, out]: matmul(x, kernel) with transB=0
        _, fq_const = _layer_classes()
        anchor = tf_layers_dict[graph_node.inputs[0].name]["tf_node"]
        saved_node, saved_trans = entry["tf_node"], graph_node.attrs.get("transB")
        entry["tf_node"] = fq_const(kernel, w.fq_min[:1], w.fq_max[:1], False, name=w.layer)(anchor)
        graph_node.attrs["transB"] = 0
        try:
            self.orig["Gemm"](graph_node=graph_node, tf_layers_dict=tf_layers_dict, **kw)
        finally:
            entry["tf_node"] = saved_node
            if saved_trans is None:
                graph_node.attrs.pop("transB", None)
            else:
                graph_node.attrs["transB"] = saved_trans
        self.weights_done.add(w.dq_output)

    def check_complete(self) -> None:
        lost = [a for a in self.plan.activations if a not in self.activation_records]
        lost += [w.name for k, w in self.plan.weights.items() if k not in self.weights_done]
        if lost:
            raise OnnxToTfVersionError(f"onnx2tf did not route {lost[:5]} through xqat's handlers; its op "
                                       "dispatch changed (expected onnx2tf.ops.<OpType>.make_node)")


def _sanitize(name: str) -> str:
    return name.replace(":", "__")  # what onnx2tf.convert's `sanitizing` does to tensor names


def _sanitized_index(items: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in items.items():
        s = _sanitize(k)
        if s in out:
            raise ExportError(f"ONNX tensors '{k}' and another one collide after onnx2tf replaces ':' by '__'; "
                              "rename them")
        out[s] = v
    return out


def _calibration_stand_in() -> np.ndarray:
    """Replaces onnx2tf's download of calibration_image_sample_data_20x128x128x3_float32.npy: onnx2tf only
    runs its internal shape checks on it, so deterministic stand-in images do; nothing touches the network."""
    return np.random.default_rng(20240601).random((20, 128, 128, 3), dtype=np.float32)


@contextlib.contextmanager
def _keras_names_reset() -> Iterator[None]:
    """Fresh Keras auto-name counters for the conversion (so names, hence .tflite bytes, do not depend on
    what ran before in the process), then the caller's counters back."""
    from tensorflow.python.keras import backend as legacy_kb  # onnx2tf builds grouped convs with it
    from tf_keras.src import backend as kb

    saved = [(m, dict(m.PER_GRAPH_OBJECT_NAME_UIDS), set(m.OBSERVED_NAMES)) for m in (kb, legacy_kb)
             if hasattr(m, "PER_GRAPH_OBJECT_NAME_UIDS")]
    for m, _, _ in saved:
        m.PER_GRAPH_OBJECT_NAME_UIDS.clear()
        m.OBSERVED_NAMES.clear()
    try:
        yield
    finally:
        for m, uids, names in saved:
            m.PER_GRAPH_OBJECT_NAME_UIDS.clear()
            m.PER_GRAPH_OBJECT_NAME_UIDS.update(uids)
            m.OBSERVED_NAMES.clear()
            m.OBSERVED_NAMES.update(names)


@contextlib.contextmanager
def installed_handlers(plan: QDQPlan) -> Iterator[_Handlers]:
    """Install xqat's handlers into onnx2tf for one conversion; everything is restored on exit, also on
    error: the four op handlers, Conv's kernel getter, the calibration download, env vars onnx2tf sets
    (CUDA_VISIBLE_DEVICES), the global RNG states it reseeds and Keras' name counters."""
    with _LOCK:
        version = check_onnx2tf()
        _, impl, ops = _import_onnx2tf()
        originals = {k: m.make_node for k, m in ops.items()}
        originals["get_weights"] = ops["Conv"].get_weights_constant_or_variable
        originals["download"] = impl.download_test_image_data
        handlers = _Handlers(plan, originals, version)
        env = {k: os.environ.get(k) for k in ("TF_USE_LEGACY_KERAS", "CUDA_VISIBLE_DEVICES")}
        rng_py, rng_np = random.getstate(), np.random.get_state()
        try:
            ops["QuantizeLinear"].make_node = handlers.quantize_linear
            ops["DequantizeLinear"].make_node = handlers.dequantize_linear
            ops["Conv"].make_node = handlers.conv
            ops["Gemm"].make_node = handlers.gemm
            ops["Conv"].get_weights_constant_or_variable = handlers.get_weights
            impl.download_test_image_data = _calibration_stand_in
            with _keras_names_reset():
                yield handlers
        finally:
            for k, m in ops.items():
                m.make_node = originals[k]
            ops["Conv"].get_weights_constant_or_variable = originals["get_weights"]
            impl.download_test_image_data = originals["download"]
            _restore_env(env)
            random.setstate(rng_py)
            np.random.set_state(rng_np)


def installed_state() -> dict[str, Any]:
    """The onnx2tf callables the handlers replace, as currently installed (for tests of the restore)."""
    _, impl, ops = _import_onnx2tf()
    state = {f"{k}.make_node": m.make_node for k, m in ops.items()}
    state["Conv.get_weights_constant_or_variable"] = ops["Conv"].get_weights_constant_or_variable
    state["download_test_image_data"] = impl.download_test_image_data
    return state


@dataclass
class KerasGraph:
    """onnx2tf's Keras model with xqat's FakeQuant ops, and where each activation FakeQuant sits."""

    model: Any  # tf_keras.Model
    activation_records: dict[str, ActivationRecord]
    onnx2tf_version: str


def onnx_to_keras(model: onnx.ModelProto, plan: QDQPlan, workdir: Path, batch_size: int | None) -> KerasGraph:
    """Run onnx2tf (no onnxsim, no file output) with xqat's handlers; all scratch files stay in `workdir`."""
    onnx_path = workdir / "model.onnx"  # onnx2tf rewrites its input file in place (op names)
    onnx.save(model, onnx_path)
    no_replacements = workdir / "no_replacements.json"  # also stops onnx2tf's auto-JSON search on errors
    no_replacements.write_text(json.dumps({"operations": []}))
    with installed_handlers(plan) as handlers:
        _, impl, _ = _import_onnx2tf()
        try:
            keras_model = impl.convert(
                input_onnx_file_path=str(onnx_path), output_folder_path=str(workdir / "onnx2tf"),
                not_use_onnxsim=True, batch_size=batch_size, param_replacement_file=str(no_replacements),
                disable_model_save=True, verbosity="error")
        except SystemExit as e:  # onnx2tf calls sys.exit(1) on some input errors
            raise ExportError(f"onnx2tf rejected the model (exit status {e.code}); see its message above") from e
        except ExportError:
            raise
        except Exception as e:
            node = getattr(e, "onnx_op_name", None)  # onnx2tf tags the node it failed on
            op = next((n.op_type for n in model.graph.node if n.name == node), None)
            what = f"ONNX node '{node}' ({op})" if node else "the model"
            hint = (f"onnx2tf has no handler for op type '{op}'" if isinstance(e, ModuleNotFoundError) else
                    f"{type(e).__name__}: {str(e)[:500]}")
            raise ExportError(f"onnx2tf could not convert {what}: {hint}; replace the layer by one of the "
                              "supported ops (Conv, Gemm, Relu, Clip, Add, Concat, pools, ...)") from e
        handlers.check_complete()
    return KerasGraph(keras_model, dict(handlers.activation_records), handlers.version)
