"""EdgeTPU rules about the file, versions and tensors (F*, T* and the model-level checks), as functions.

Each returns a message when the model or op breaks the rule, else None; `rules.py` gives each its level,
code and fix. The rules are explained in docs/edgetpu.md; nothing here reads files or imports TensorFlow.
"""

from __future__ import annotations

import numpy as np

from ..tflite.model import TFLiteModel, TFLiteOp, TFLiteTensor
from .rules_base import QRANGE, filter_positions, input_tensor, is_boundary_op, names, non_unit, op_code, tensors
from .rules_ops import unsupported
from .versions import COMPILER_TF, MAX_BUILTIN_CODE, UNCERTAIN_TF, first_release, format_release

PARAM_CACHE_BYTES = 8 * 2**20  # ~8 MB on-chip parameter cache
# Heuristic: very large activations fail to compile; a compiled DeepLab mapped a 3 MiB one (257x257x48).
LARGE_ACTIVATION_BYTES = 4 * 2**20
TINY_SCALE = 1e-6  # an int8 range narrower than ~2.5e-4 is a dead layer
CONV_LIKE = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV"})
_INT32_MAX = 2**31 - 1
_BOUNDED_ACTS = {"RELU6": (0.0, 6.0), "RELU_N1_TO_1": (-1.0, 1.0)}
_FLOATS = ("FLOAT32", "FLOAT16", "FLOAT64")
# The int8 LSTM kernels keep their cell state (input 19) in int16; the compiler maps them all the same
# (compiled pair keras_lstm_mnist_ptq, docs/edgetpu.md, "Evidence from compiled pairs").
_LSTM_STATE_INPUTS = {"UNIDIRECTIONAL_SEQUENCE_LSTM": (19,), "LSTM": (19,)}

def _activations(m: TFLiteModel, op: TFLiteOp) -> list[TFLiteTensor]:
    """Non-constant inputs and outputs of `op`."""
    return [t for t in tensors(m, (*op.inputs, *op.outputs)) if not t.is_constant]


def _owned(m: TFLiteModel, op: TFLiteOp) -> list[TFLiteTensor]:
    """Tensors a tensor rule reports at `op`: its outputs, and inputs no op writes (model inputs, constants)."""
    ins = [t for t in tensors(m, op.inputs) if t.index not in m.producers]
    return tensors(m, op.outputs) + ins


def _runtime(op: TFLiteOp):
    return first_release(op.name, op.version)


# ----------------------------------------------------------------------------- file, op codes, versions

def control_flow(m, op):
    return f"control-flow/variable op {op.name}: the EdgeTPU runs feed-forward graphs only"


def custom(m, op):
    return (f"{op.name} is a custom/Flex op: it runs on the CPU (the model still compiles, as a PoseNet with "
            "its custom decoder op did)")


def new_code(m, op):
    code = op_code(op)
    if code > MAX_BUILTIN_CODE:
        return (f"op code {code} ({op.name}) is newer than compiler 16's TFLite (last code {MAX_BUILTIN_CODE});"
                f" the compile fails with 'Op builtin_code out of range: {code}'")
    return None


def version_fail(m, op):
    if op_code(op) > MAX_BUILTIN_CODE:
        return None  # F4 already fails the compile
    rt = _runtime(op)
    if rt == "newer" or (rt is not None and rt > UNCERTAIN_TF):
        return (f"{op.name} version {op.version} first shipped in {format_release(rt)}; compiler 16 (TF 2.5 era) "
                f"fails with \"Didn't find op for builtin opcode '{op.name}' version '{op.version}'\"")
    return None


def version_uncertain(m, op):
    if _runtime(op) == UNCERTAIN_TF:
        return (f"{op.name} version {op.version} first shipped in TF 2.6; compiler 16 may not know it "
                "(the compiler's exact TF commit is unknown)")
    return None


# ---------------------------------------------------------------------------------------------- tensors

def float_model(m, op):
    """Conv/FC with float filters: the model was not quantized, which the compiler refuses."""
    act_k, w_k, _ = filter_positions(op)
    act, w = input_tensor(m, op, act_k), input_tensor(m, op, w_k)
    if w is not None and w.dtype in _FLOATS and (act is None or act.dtype in _FLOATS):
        return (f"{op.name} computes in float (filter '{w.name}' is {w.dtype}): the model is not quantized and "
                "the compiler refuses it ('Model not quantized')")
    return None


def not_8bit(m, op):
    """An op reading or writing a non-8-bit activation runs on the CPU (float, int16, int32, int64, bool)."""
    if (op.name.startswith("CUSTOM") or is_boundary_op(m, op) or unsupported(m, op)
            or (op.name in CONV_LIKE and float_model(m, op))):
        return None  # F3, O10, O1 and the FAIL above say it
    state = {op.inputs[k] for k in _LSTM_STATE_INPUTS.get(op.name, ()) if k < len(op.inputs)}
    bad = [t for t in _activations(m, op) if t.dtype not in QRANGE and t.index not in state]
    if bad:
        return (f"{bad[0].dtype} activation {names(bad)}: the EdgeTPU computes on 8-bit tensors only, so this "
                "op runs on the CPU")
    return None


def io_conversion(m, op):
    """QUANTIZE of a float model input / DEQUANTIZE to a float model output: CPU ops around the TPU segment."""
    if not is_boundary_op(m, op):
        return None
    ins, outs = tensors(m, op.inputs), tensors(m, op.outputs)
    if ins and ins[0].dtype in _FLOATS and ins[0].index in m.inputs:
        return f"{op.name} of the float input '{ins[0].name}' runs on the CPU, before the TPU segment"
    if ins and ins[0].dtype in _FLOATS:
        return f"{op.name} of the float tensor '{ins[0].name}' to the output '{outs[0].name}' runs on the CPU"
    if outs and outs[0].dtype in _FLOATS:
        return f"{op.name} to the float output '{outs[0].name}' runs on the CPU, after the TPU segment"
    return None


def quant_params(m, op):
    problems = []
    for t in _owned(m, op):
        if t.dtype not in QRANGE:
            continue
        lo, hi = QRANGE[t.dtype]
        if not t.is_quantized:
            problems.append(f"'{t.name}' has no scale/zero point")
        elif not np.all(np.isfinite(t.scales) & (t.scales > 0)):
            problems.append(f"'{t.name}' has a scale <= 0 or not finite ({t.scales[:4].tolist()})")
        elif t.zero_points.size and not np.all((t.zero_points >= lo) & (t.zero_points <= hi)):
            problems.append(f"'{t.name}' has a zero point outside [{lo}, {hi}]")
        elif not t.is_constant and t.scales.size > 1:
            problems.append(f"activation '{t.name}' is quantized per axis ({t.scales.size} scales)")
    return "; ".join(problems) or None


def weights_bias(m, op):
    act_k, w_k, b_k = filter_positions(op)
    act, w, b = input_tensor(m, op, act_k), input_tensor(m, op, w_k), input_tensor(m, op, b_k)
    if act is None or act.dtype not in QRANGE or w is None:
        return None  # float ops are T1's job
    problems = []
    if not w.is_constant:
        problems.append(f"filter '{w.name}' is not a constant")
    elif w.dtype not in QRANGE:
        problems.append(f"filter '{w.name}' is {w.dtype}, not int8/uint8")
    elif w.dtype == "INT8" and w.zero_points.size and np.any(w.zero_points != 0):
        problems.append(f"int8 filter '{w.name}' has a non-zero zero point")
    if b is not None:
        if not b.is_constant:
            problems.append(f"bias '{b.name}' is not a constant")
        elif b.dtype != "INT32":
            problems.append(f"bias '{b.name}' is {b.dtype}, not INT32 (edgetpu#212)")
    return "; ".join(problems) or None


def per_axis(m, op):
    _, w_k, _ = filter_positions(op)
    w = input_tensor(m, op, w_k)
    if w is None or w.dtype not in QRANGE or w.scales.size <= 1:
        return None
    if op.name == "FULLY_CONNECTED" and not np.all(w.scales == w.scales[0]):
        return (f"fully-connected filter '{w.name}' is quantized per channel ({w.scales.size} scales); "
                "compiler 16 predates per-channel FC (TF made it the default in 2024)")
    want = 3 if op.name == "DEPTHWISE_CONV_2D" else 0
    if w.quantized_dimension != want:
        return (f"filter '{w.name}' is quantized along dim {w.quantized_dimension}; {op.name} needs dim {want}"
                " ('quantized_dimension must be in range', TF#27880)")
    if len(w.shape) > want and w.scales.size != w.shape[want]:
        return f"filter '{w.name}' has {w.scales.size} scales for {w.shape[want]} output channels"
    return None


def rank_3(m, op):
    bad = [t for t in _activations(m, op) if non_unit(t.shape) > 3]
    if bad:
        return (f"tensor {names(bad)} has more than 3 dims > 1 ('Tensor has unsupported rank (up to 3 "
                "innermost dimensions mapped)')")
    return None


def rank_4(m, op):
    bad = [t for t in _activations(m, op) if len(t.shape) > 4]
    if bad:
        return f"tensor {names(bad)} has rank {len(bad[0].shape)} > 4"
    return None


def act_overflow(m, op):
    bounds = _BOUNDED_ACTS.get(op.fused_activation)
    out = m.tensors[op.outputs[0]] if op.outputs else None
    if bounds is None or out is None or out.dtype not in QRANGE or not out.is_quantized:
        return None
    s, z = float(out.scales[0]), int(out.zero_points[0]) if out.zero_points.size else 0
    if s <= 0:
        return None  # T2 reports it
    q = [z + round(b / s) for b in bounds]
    if max(abs(v) for v in q) > _INT32_MAX:
        return (f"output '{out.name}' scale {s:.3g} with fused {op.fused_activation}: the activation bound "
                f"{bounds[1]} quantizes to {max(q)}, past int32 ('no_integer_overflow_from_quantization', "
                "edgetpu#453)")
    return None


def tiny_scale(m, op):
    tiny = [t for t in tensors(m, op.outputs) if t.dtype in QRANGE and t.is_quantized
            and 0 < float(t.scales.max()) < TINY_SCALE]
    if tiny:
        return (f"output {names(tiny)} has scale {float(tiny[0].scales.max()):.3g}: its whole int8 range is "
                "below 2.5e-4, so the layer is dead or its range was never calibrated")
    return None


def large_activation(m, op):
    big = [t for t in tensors(m, op.outputs)
           if t.np_dtype is not None and int(np.prod(t.shape)) * np.dtype(t.np_dtype).itemsize
           > LARGE_ACTIVATION_BYTES]
    if big:
        n = int(np.prod(big[0].shape)) * np.dtype(big[0].np_dtype).itemsize
        return (f"activation {names(big)} is {n / 2**20:.1f} MiB; large activations fail with "
                "'Compilation failed due to large activation tensors'")
    return None


def input_transpose(m, op):
    if any(i in m.inputs for i in op.inputs):
        return "TRANSPOSE of a model input (NCHW->NHWC at the entry); such graphs often fail to compile"
    return None


# ---------------------------------------------------------------------------------------------- model

def schema(m):
    return None if m.schema_version == 3 else f"schema version {m.schema_version}, the compiler reads 3"


def subgraphs(m):
    if m.num_subgraphs > 1:
        return f"{m.num_subgraphs} subgraphs; the compiler handles a single feed-forward subgraph"
    return None


def min_runtime(m):
    raw = m.metadata.get("min_runtime_version", b"").split(b"\0")[0].decode("ascii", "replace")
    try:
        version = tuple(int(p) for p in raw.split(".")[:2])
    except ValueError:
        return None
    if len(version) == 2 and version > COMPILER_TF:
        return f"the converter marked this model min_runtime_version {raw} (> 2.5, the compiler's TFLite)"
    return None


def dynamic(m):
    dyn = [t for t in m.tensors if any(d < 0 for d in t.shape_signature)]
    if dyn:
        return f"dynamic dims (-1) in {names(dyn)}; the compile fails with 'Model not quantized'"
    return None


def io_batch(m):
    bad = [m.tensors[i] for i in (*m.inputs, *m.outputs)
           if len(m.tensors[i].shape_signature) > 1 and m.tensors[i].shape_signature[0] > 1]
    if bad:
        return f"model input/output {names(bad)} has batch > 1; the EdgeTPU takes batch 1"
    return None


def io_dtype(m):
    """uint8 I/O of an int8 graph: the converter adds QUANTIZE ops at the edges (they map from runtime 13 on)."""
    notes = []
    for kind, idx in (("input", m.inputs), ("output", m.outputs)):
        ops = [m.consumers.get(i, []) for i in idx] if kind == "input" else [[m.producers.get(i)] for i in idx]
        notes += [f"{kind} '{t.name}' is uint8: the QUANTIZE that converts it maps from runtime 13 on"
                  for t, users in zip(tensors(m, idx), ops) if t.dtype == "UINT8"
                  and any(u is not None and u.name == "QUANTIZE" for u in users)]
    return "; ".join(notes) or None


def params(m):
    n = sum(t.data.nbytes for t in m.tensors if t.is_constant)
    if n > PARAM_CACHE_BYTES:
        return f"{n / 2**20:.1f} MiB of parameters exceed the ~8 MiB on-chip cache; the rest streams off-chip"
    return None
