"""EdgeTPU compiler 16 rules as data: op-version ceilings, the supported-op table and the per-op limits.

Each rule carries a checklist code of edgetpu-readiness.md §5, a level (FAIL: the compile fails; CPU: the op
and everything after it leave the TPU; WARN: a risk), the ops it applies to, a check that returns a message
or None, and a fix hint. `xqat.edgetpu.check` runs them; nothing here reads files or imports TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from ..tflite.model import TFLiteModel, TFLiteOp, TFLiteTensor

__all__ = ["FAIL", "CPU", "WARN", "OpRule", "ModelRule", "OP_RULES", "MODEL_RULES", "RUNTIME_VERSIONS",
           "SUPPORTED_OPS", "UNVERIFIED_OPS", "COMPILER_TF", "MAX_BUILTIN_CODE", "is_boundary_op", "op_code"]

FAIL, CPU, WARN = "FAIL", "CPU", "WARN"

# §2: compiler 16.0.384591198 embeds a TF-2.5-era TFLite op resolver. Op versions first shipped in 2.6 are
# uncertain (WARN), anything later makes the whole compile fail.
COMPILER_TF = (2, 5)
UNCERTAIN_TF = (2, 6)
MAX_BUILTIN_CODE = 139  # HASHTABLE_SIZE, the last op code of TF 2.5 (§5 F4); GELU is 150

# §2/§5 F5: first TF release whose TFLite runtime knows (op, version), transcribed from TF's
# tensorflow/lite/tools/versioning/runtime_version.cc (the TF 2.11-era map). Entry i is version i+1;
# "-" marks a version that never existed. A version past the end of a row appeared after that map, so it
# is newer than the compiler in any case.
_RUNTIME_TABLE = """
ABS 1.13 2.4 2.5 2.6
ADD 1.5 1.14 2.4 2.6
ADD_N 1.14
ARG_MAX 1.9 1.14 2.9
ARG_MIN 1.9 1.14 2.9
ASSIGN_VARIABLE 2.6
ATAN2 2.10
AVERAGE_POOL_2D 1.5 1.14 2.3
BATCH_MATMUL 2.3 2.3 2.4 2.5
BATCH_TO_SPACE_ND 1.6 1.14 2.3
BIDIRECTIONAL_SEQUENCE_LSTM 1.14 1.14 1.14
BIDIRECTIONAL_SEQUENCE_RNN 1.14 1.14 2.3
BROADCAST_ARGS 2.6
BROADCAST_TO - 2.5 2.5
BUCKETIZE 2.8
CALL_ONCE 2.5
CAST 1.5 2.7 2.8 2.9
CEIL 1.14
COMPLEX_ABS 2.5
CONCATENATION 1.5 1.14 2.3
CONV_2D 1.5 1.14 1.14 2.3 2.4 2.9
CONV_3D 2.5
CONV_3D_TRANSPOSE 2.6
COS 1.14
CUMSUM 2.4
DENSIFY 2.2
DEPTH_TO_SPACE 2.1 2.5
DEPTHWISE_CONV_2D 1.5 1.12 1.14 2.2 2.3 2.3
DEQUANTIZE 1.13 1.14 1.15 2.2 2.7
DIV 1.6 2.3
DYNAMIC_UPDATE_SLICE 2.9
ELU 1.14
EMBEDDING_LOOKUP 1.13 1.14 1.14
EMBEDDING_LOOKUP_SPARSE 1.5
EQUAL 1.14 1.14 2.3
EXP 1.7
EXPAND_DIMS 1.10
FAKE_QUANT 1.5 1.10
FILL 1.13 2.3 2.5
FLOOR 1.9
FLOOR_DIV 1.14 1.14
FLOOR_MOD 1.13
FULLY_CONNECTED 1.5 1.10 1.14 1.14 2.0 2.1 2.3 2.3 2.3
GATHER 1.6 1.14 1.15 2.4 2.5
GATHER_ND 1.14 2.3 2.5
GELU 2.9 2.9
GREATER 1.14 1.14
GREATER_EQUAL 1.14 1.14
HARD_SWISH 1.15
HASHTABLE 2.5
HASHTABLE_FIND 2.5
HASHTABLE_IMPORT 2.5
HASHTABLE_LOOKUP 1.5
HASHTABLE_SIZE 2.5
IF 1.15
IMAG 2.5
L2_NORMALIZATION 1.5 1.14
L2_POOL_2D 1.5
LEAKY_RELU 1.13 2.3
LESS 1.14 1.14
LESS_EQUAL 1.14 1.14
LOCAL_RESPONSE_NORMALIZATION 1.5
LOG 1.14
LOG_SOFTMAX 1.14 1.14
LOGICAL_AND 1.11
LOGICAL_NOT 1.11
LOGICAL_OR 1.11
LOGISTIC 1.14 1.14 2.3
LSH_PROJECTION 1.5
LSTM 1.7 1.10 1.14 2.3
MATRIX_DIAG 1.14
MATRIX_SET_DIAG 1.14
MAX_POOL_2D 1.5 1.14 2.3
MAXIMUM 1.14 1.14 2.3 2.3
MEAN 1.6 1.14 2.4
MINIMUM 1.14 1.14 2.3 2.3
MIRROR_PAD 1.13 2.3
MUL 1.5 1.14 1.15 2.3 2.6
MULTINOMIAL 2.8
NEG 1.9
NON_MAX_SUPPRESSION_V4 2.1
NON_MAX_SUPPRESSION_V5 2.1
NOT_EQUAL 1.14 1.14 2.3
ONE_HOT 1.11
PACK 1.11 1.14 2.3
PAD 1.5 1.14 2.4 2.6
PADV2 1.9 1.14 2.4 2.6
POW 1.10
PRELU 1.8
QUANTIZE 1.14 1.15 2.7
RANDOM_STANDARD_NORMAL 2.8
RANDOM_UNIFORM 2.8
RANGE 1.13
RANK 1.14
READ_VARIABLE 2.6
REAL 2.5
REDUCE_ALL 2.6
REDUCE_ANY 1.11
REDUCE_MAX 1.11 1.14 2.5
REDUCE_MIN 1.11 1.14 2.5
REDUCE_PROD 1.11 2.6
RELU 1.5 2.1 2.5
RELU_0_TO_1 2.10
RELU_N1_TO_1 1.5
RELU6 1.5 1.14 2.5
RESHAPE 1.5
RESIZE_BILINEAR 1.7 1.14 2.2 2.5
RESIZE_NEAREST_NEIGHBOR 1.13 1.14 2.3 2.4
REVERSE_SEQUENCE 1.14
REVERSE_V2 1.14 2.2 2.5
RFFT2D 2.5
RNN 1.5 1.14 2.3
ROUND 1.14
RSQRT 1.10 2.5
SCATTER_ND 2.1
SEGMENT_SUM 2.2
SELECT 1.14 1.14
SELECT_V2 2.2
SHAPE 1.10
SIN 1.9
SKIP_GRAM 1.5
SLICE 1.14 1.14 1.14 2.4 2.5
SOFTMAX 1.5 1.14 2.3
SPACE_TO_BATCH_ND 1.6 1.14 2.3
SPACE_TO_DEPTH 1.5 1.14
SPARSE_TO_DENSE 1.9 1.14 1.15
SPLIT 1.5 1.14 1.14 2.3
SPLIT_V 1.13 2.3
SQRT 1.10
SQUARE 1.12
SQUARED_DIFFERENCE 1.13 2.5
SQUEEZE 1.6 2.5
STRIDED_SLICE 1.6 1.14 2.1 2.2 2.5 2.6
SUB 1.6 1.14 2.3 2.4 2.4
SUM 1.10 1.15
SVDF 1.5 1.14 2.2 2.3
TANH 1.14 1.14 2.3
TILE 1.10 2.2 2.8
TOPK_V2 1.7 1.14
TRANSPOSE 1.6 1.14 1.15 2.3 2.4
TRANSPOSE_CONV 1.9 2.2 2.3
UNIDIRECTIONAL_SEQUENCE_LSTM 1.13 1.14 2.3
UNIDIRECTIONAL_SEQUENCE_RNN 1.14 1.14 2.3
UNIQUE 1.14
UNPACK 1.11 1.14 2.2 2.3
UNSORTED_SEGMENT_MAX 2.10
UNSORTED_SEGMENT_MIN 2.11
UNSORTED_SEGMENT_PROD 2.10
UNSORTED_SEGMENT_SUM 2.10
VAR_HANDLE 2.6
WHERE 1.14 2.8
WHILE 1.15
ZEROS_LIKE 1.12
"""


def _parse_runtime_table(text: str) -> dict[str, tuple[tuple[int, int] | None, ...]]:
    rows = {}
    for line in text.strip().splitlines():
        name, *versions = line.split()
        rows[name] = tuple(None if v == "-" else tuple(int(p) for p in v.split(".")) for v in versions)
    return rows


RUNTIME_VERSIONS: dict[str, tuple[tuple[int, int] | None, ...]] = _parse_runtime_table(_RUNTIME_TABLE)

# §1a: ops in Coral's table (runtime <= 14). LSTM means unidirectional only; limits are the O* rules below.
SUPPORTED_OPS = frozenset({
    "ADD", "SUB", "MUL", "MAXIMUM", "MINIMUM", "AVERAGE_POOL_2D", "MAX_POOL_2D", "CONCATENATION", "CONV_2D",
    "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "EXPAND_DIMS", "PACK", "QUANTIZE", "SUM", "TRANSPOSE_CONV",
    "L2_NORMALIZATION", "LOGISTIC", "TANH", "RELU", "RELU6", "RELU_N1_TO_1", "LSTM",
    "UNIDIRECTIONAL_SEQUENCE_LSTM", "MEAN", "PAD", "PRELU", "REDUCE_MAX", "REDUCE_MIN", "RESHAPE",
    "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "SLICE", "SPACE_TO_DEPTH", "SPLIT", "SOFTMAX", "SQUEEZE",
    "STRIDED_SLICE",
})
# §1a/§8: rows that only newer, partly read copies of the table list, or that are listed but known not to map.
UNVERIFIED_OPS = {
    "TRANSPOSE": "listed for runtime >= 14 only in newer copies of Coral's table; older compilers leave it on "
                 "the CPU (edgetpu#193, #317)",
    "RSQRT": "listed for runtime >= 14 only in newer copies of Coral's table",
    "SQUARED_DIFFERENCE": "listed for runtime >= 14 only in newer copies of Coral's table",
    "SPLIT_V": "not in the copies of Coral's table read; only SPLIT is",
    "PADV2": "not in Coral's table; only PAD is",
    "TRANSPOSE_CONV": "listed, but often reported as not mapped (edgetpu#684, #686)",
}
_CONTROL_FLOW = frozenset({"WHILE", "IF", "CALL_ONCE", "VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE"})

SOFTMAX_MAX_ELEMENTS = 16_000  # §1a Softmax
MEAN_Z_MULTIPLE = 4  # §1a Mean: a reduction over channels needs a multiple of 4
PARAM_CACHE_BYTES = 8 * 2**20  # §1 Memory: ~8 MB on-chip parameter cache
LARGE_ACTIVATION_BYTES = 2 * 2**20  # §5 T9 heuristic
RESIZE_MAX_SIDE = 256  # §1a Resize: 128x128 mapped, 512x512 did not (edgetpu#31); the cut is a guess
TINY_SCALE = 1e-6  # §5 T8: an int8 range narrower than ~2.5e-4 is a dead layer
_INT32_MAX = 2**31 - 1
_QRANGE = {"INT8": (-128, 127), "UINT8": (0, 255)}
_BOUNDED_ACTS = {"RELU6": (0.0, 6.0), "RELU_N1_TO_1": (-1.0, 1.0)}
_CODES = {k: v for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


# ----------------------------------------------------------------------------------------------- helpers

def op_code(op: TFLiteOp) -> int:
    """The builtin op code of `op` (32 for CUSTOM ops), recovered from its schema name."""
    if op.name.startswith("CUSTOM"):
        return _CODES["CUSTOM"]
    if op.name in _CODES:
        return _CODES[op.name]
    return int(op.name.removeprefix("OP_")) if op.name.startswith("OP_") else -1


def is_boundary_op(m: TFLiteModel, op: TFLiteOp) -> bool:
    """QUANTIZE of a model input, or QUANTIZE/DEQUANTIZE writing a model output: the conversions float or
    uint8 I/O adds at the boundaries (§1 int8 vs uint8); they run around the TPU segment, not inside it."""
    writes_output = any(o in m.outputs for o in op.outputs)
    if op.name == "QUANTIZE":
        return writes_output or any(i in m.inputs for i in op.inputs)
    return op.name == "DEQUANTIZE" and writes_output


def _tensors(m: TFLiteModel, idx) -> list[TFLiteTensor]:
    return [m.tensors[i] for i in idx if i >= 0]


def _activations(m: TFLiteModel, op: TFLiteOp) -> list[TFLiteTensor]:
    """Non-constant inputs and outputs of `op`."""
    return [t for t in _tensors(m, (*op.inputs, *op.outputs)) if not t.is_constant]


def _owned(m: TFLiteModel, op: TFLiteOp) -> list[TFLiteTensor]:
    """Tensors a tensor rule reports at `op`: its outputs, and inputs no op writes (model inputs, constants)."""
    ins = [t for t in _tensors(m, op.inputs) if t.index not in m.producers]
    return _tensors(m, op.outputs) + ins


def _input(m: TFLiteModel, op: TFLiteOp, k: int) -> TFLiteTensor | None:
    return m.tensors[op.inputs[k]] if k < len(op.inputs) and op.inputs[k] >= 0 else None


def _const(m: TFLiteModel, op: TFLiteOp, k: int) -> np.ndarray | None:
    t = _input(m, op, k)
    return t.data if t is not None else None


def _non_unit(shape) -> int:
    return sum(1 for d in shape if d != 1)


def _names(tensors: list[TFLiteTensor], limit: int = 3) -> str:
    names = [f"'{t.name}' {list(t.shape_signature)}" for t in tensors[:limit]]
    more = f" and {len(tensors) - limit} more" if len(tensors) > limit else ""
    return ", ".join(names) + more


def _axes(values: np.ndarray | None, rank: int) -> list[int] | None:
    if values is None:
        return None
    return sorted({int(a) % rank for a in np.ravel(values)}) if rank else []


def _filter_positions(op: TFLiteOp) -> tuple[int, int, int]:
    """(activation input, filter, bias) positions of a conv-like op; TRANSPOSE_CONV puts output_shape first."""
    return (2, 1, 3) if op.name == "TRANSPOSE_CONV" else (0, 1, 2)


def _runtime(op: TFLiteOp) -> tuple[int, int] | None | str:
    """First TF release that knows (op, version); "newer" past the table; None when the table has no row."""
    row = RUNTIME_VERSIONS.get(op.name)
    if row is None:
        return None
    if op.version > len(row) or op.version < 1 or row[op.version - 1] is None:
        return "newer"
    return row[op.version - 1]


def _fmt_tf(v) -> str:
    return "a TF release after the compiler's" if v == "newer" else f"TF {v[0]}.{v[1]}"


# ----------------------------------------------------------------------------------------- op-level checks

def _control_flow(m, op):
    return f"control-flow/variable op {op.name}: the EdgeTPU runs feed-forward graphs only"


def _custom(m, op):
    return f"{op.name} is a custom/Flex op, which the EdgeTPU cannot run"


def _new_code(m, op):
    code = op_code(op)
    if code > MAX_BUILTIN_CODE:
        return (f"op code {code} ({op.name}) is newer than compiler 16's TFLite (last code {MAX_BUILTIN_CODE});"
                f" the compile fails with 'Op builtin_code out of range: {code}'")
    return None


def _version_fail(m, op):
    if op_code(op) > MAX_BUILTIN_CODE:
        return None  # F4 already fails the compile
    rt = _runtime(op)
    if rt == "newer" or (rt is not None and rt > UNCERTAIN_TF):
        return (f"{op.name} version {op.version} first shipped in {_fmt_tf(rt)}; compiler 16 (TF 2.5 era) "
                f"fails with \"Didn't find op for builtin opcode '{op.name}' version '{op.version}'\"")
    return None


def _version_uncertain(m, op):
    if _runtime(op) == UNCERTAIN_TF:
        return (f"{op.name} version {op.version} first shipped in TF 2.6; compiler 16 may not know it "
                "(the compiler's exact TF commit is unknown)")
    return None


def _io_exempt(m: TFLiteModel, op: TFLiteOp) -> set[int]:
    """Model I/O tensors that a boundary QUANTIZE/DEQUANTIZE converts: O10's business, not T1's."""
    return set(m.inputs) | set(m.outputs) if is_boundary_op(m, op) else set()


def _float_tensors(m, op):
    io = _io_exempt(m, op)
    bad = [t for t in _owned(m, op) if not t.is_constant and t.index not in io
           and t.dtype in ("FLOAT32", "FLOAT16", "FLOAT64", "INT16")]
    if bad:
        return (f"{bad[0].dtype} activation {_names(bad)}: the compiler rejects models with float or int16 "
                "activations ('Model not quantized')")
    return None


def _int_tensors(m, op):
    io = _io_exempt(m, op)
    bad = [t for t in _owned(m, op) if not t.is_constant and t.index not in io
           and t.dtype not in ("INT8", "UINT8", "FLOAT32", "FLOAT16", "FLOAT64", "INT16")]
    if bad:
        return f"{bad[0].dtype} activation {_names(bad)}: the EdgeTPU computes on 8-bit tensors only"
    return None


def _quant_params(m, op):
    problems = []
    for t in _owned(m, op):
        if t.dtype not in _QRANGE:
            continue
        lo, hi = _QRANGE[t.dtype]
        if not t.is_quantized:
            problems.append(f"'{t.name}' has no scale/zero point")
        elif not np.all(np.isfinite(t.scales) & (t.scales > 0)):
            problems.append(f"'{t.name}' has a scale <= 0 or not finite ({t.scales[:4].tolist()})")
        elif t.zero_points.size and not np.all((t.zero_points >= lo) & (t.zero_points <= hi)):
            problems.append(f"'{t.name}' has a zero point outside [{lo}, {hi}]")
        elif not t.is_constant and t.scales.size > 1:
            problems.append(f"activation '{t.name}' is quantized per axis ({t.scales.size} scales)")
    return "; ".join(problems) or None


def _weights_bias(m, op):
    act_k, w_k, b_k = _filter_positions(op)
    act, w, b = _input(m, op, act_k), _input(m, op, w_k), _input(m, op, b_k)
    if act is None or act.dtype not in _QRANGE or w is None:
        return None  # float ops are T1's job
    problems = []
    if not w.is_constant:
        problems.append(f"filter '{w.name}' is not a constant")
    elif w.dtype not in _QRANGE:
        problems.append(f"filter '{w.name}' is {w.dtype}, not int8/uint8")
    elif w.dtype == "INT8" and w.zero_points.size and np.any(w.zero_points != 0):
        problems.append(f"int8 filter '{w.name}' has a non-zero zero point")
    if b is not None:
        if not b.is_constant:
            problems.append(f"bias '{b.name}' is not a constant")
        elif b.dtype != "INT32":
            problems.append(f"bias '{b.name}' is {b.dtype}, not INT32 (edgetpu#212)")
    return "; ".join(problems) or None


def _per_axis(m, op):
    _, w_k, _ = _filter_positions(op)
    w = _input(m, op, w_k)
    if w is None or w.dtype not in _QRANGE or w.scales.size <= 1:
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


def _rank_3(m, op):
    bad = [t for t in _activations(m, op) if _non_unit(t.shape) > 3]
    if bad:
        return (f"tensor {_names(bad)} has more than 3 dims > 1 ('Tensor has unsupported rank (up to 3 "
                "innermost dimensions mapped)')")
    return None


def _rank_4(m, op):
    bad = [t for t in _activations(m, op) if len(t.shape) > 4]
    if bad:
        return f"tensor {_names(bad)} has rank {len(bad[0].shape)} > 4"
    return None


def _act_overflow(m, op):
    bounds = _BOUNDED_ACTS.get(op.fused_activation)
    out = m.tensors[op.outputs[0]] if op.outputs else None
    if bounds is None or out is None or out.dtype not in _QRANGE or not out.is_quantized:
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


def _tiny_scale(m, op):
    tiny = [t for t in _tensors(m, op.outputs) if t.dtype in _QRANGE and t.is_quantized
            and 0 < float(t.scales.max()) < TINY_SCALE]
    if tiny:
        return (f"output {_names(tiny)} has scale {float(tiny[0].scales.max()):.3g}: its whole int8 range is "
                "below 2.5e-4, so the layer is dead or its range was never calibrated")
    return None


def _large_activation(m, op):
    big = [t for t in _tensors(m, op.outputs)
           if t.np_dtype is not None and int(np.prod(t.shape)) * np.dtype(t.np_dtype).itemsize
           > LARGE_ACTIVATION_BYTES]
    if big:
        n = int(np.prod(big[0].shape)) * np.dtype(big[0].np_dtype).itemsize
        return (f"activation {_names(big)} is {n / 2**20:.1f} MiB; large activations fail with "
                "'Compilation failed due to large activation tensors'")
    return None


def _input_transpose(m, op):
    if any(i in m.inputs for i in op.inputs):
        return "TRANSPOSE of a model input (NCHW->NHWC at the entry); such graphs often fail to compile"
    return None


def _unsupported(m, op):
    if (op.name in SUPPORTED_OPS or op.name in UNVERIFIED_OPS or op.name in _CONTROL_FLOW
            or op.name.startswith("CUSTOM") or op_code(op) > MAX_BUILTIN_CODE or is_boundary_op(m, op)):
        return None
    return f"{op.name} is not in the EdgeTPU's supported-op table"


def _unverified(m, op):
    return f"{op.name}: {UNVERIFIED_OPS[op.name]}"


def _dilation(m, op):
    h, w = op.options.get("dilationHFactor", 1), op.options.get("dilationWFactor", 1)
    if h != w:
        return f"dilation {h}x{w} differs between height and width"
    return None


def _grouped(m, op):
    x, w = _input(m, op, 0), _input(m, op, 1)
    if x is not None and w is not None and len(x.shape) == 4 and len(w.shape) == 4 and x.shape[3] != w.shape[3]:
        return (f"grouped conv: input has {x.shape[3]} channels, filter '{w.name}' takes {w.shape[3]} "
                f"({x.shape[3] // max(w.shape[3], 1)} groups); CONV_2D v6 fails to compile (edgetpu#631)")
    return None


def _depth_multiplier(m, op):
    x, w = _input(m, op, 0), _input(m, op, 1)
    if x is not None and w is not None and len(x.shape) == 4 and len(w.shape) == 4 and w.shape[3] != x.shape[3]:
        return f"depthwise conv with depth multiplier {w.shape[3] // max(x.shape[3], 1)} (unverified on EdgeTPU)"
    return None


def _fc_layout(m, op):
    problems = []
    if op.options.get("weightsFormat", 0) != 0:
        problems.append("weights are not in the DEFAULT format")
    if op.options.get("keepNumDims", False):
        problems.append("keep_num_dims is set")
    out = m.tensors[op.outputs[0]] if op.outputs else None
    if out is not None and _non_unit(out.shape) > 1:
        problems.append(f"output '{out.name}' {list(out.shape_signature)} has more than one dim > 1")
    return ("fully connected: " + "; ".join(problems)) if problems else None


def _fused_act(m, op):
    if op.fused_activation != "NONE":
        return f"{op.name} has a fused {op.fused_activation} activation"
    return None


def _concat_const(m, op):
    consts = [t for t in _tensors(m, op.inputs) if t.is_constant]
    if not consts:
        return None
    zero = all(np.all(t.data.astype(np.int64) == (int(t.zero_points[0]) if t.zero_points.size else 0))
               for t in consts)
    if len(op.inputs) == 2 and zero:
        return None
    return (f"concatenation with constant input {_names(consts)}: allowed only with exactly 2 inputs and an "
            "all-zero constant")


def _axis_batch(m, op):
    x = _input(m, op, 0)
    rank = len(x.shape) if x is not None else 0
    if op.name in ("MEAN", "SUM", "REDUCE_MAX", "REDUCE_MIN"):
        axes = _axes(_const(m, op, 1), rank)
        if axes is None:
            return f"{op.name} axes are not a constant"
        if rank > 1 and 0 in axes:
            return f"{op.name} reduces the batch dim"
        if op.name == "MEAN" and rank >= 3 and rank - 1 in axes and x.shape[-1] % MEAN_Z_MULTIPLE:
            return (f"MEAN over the channel dim of {x.shape[-1]} channels (needs a multiple of "
                    f"{MEAN_Z_MULTIPLE})")
    elif op.name in ("PAD", "PADV2", "MIRROR_PAD"):
        pads = _const(m, op, 1)
        if pads is None:
            return "PAD paddings are not a constant"
        if rank > 1 and np.any(pads[0] != 0):
            return f"{op.name} pads the batch dim ({pads[0].tolist()})"
    elif op.name == "PACK":
        out = m.tensors[op.outputs[0]]
        if len(out.shape) > 1 and op.options.get("axis", 0) % len(out.shape) == 0:
            return "PACK along the batch dim"
    elif op.name in ("SPLIT", "SPLIT_V"):
        axis_k, x = (0, _input(m, op, 1)) if op.name == "SPLIT" else (2, _input(m, op, 0))
        rank = len(x.shape) if x is not None else 0
        axes = _axes(_const(m, op, axis_k), rank)
        if axes is None:
            return f"{op.name} axis is not a constant"
        if rank > 1 and 0 in axes:
            return f"{op.name} splits the batch dim"
    return None


def _softmax(m, op):
    x = _input(m, op, 0)
    n = int(np.prod(x.shape)) if x is not None else 0
    if x is not None and (_non_unit(x.shape) > 1 or n > SOFTMAX_MAX_ELEMENTS):
        return (f"softmax input '{x.name}' {list(x.shape_signature)} ({n} elements): the EdgeTPU takes 1 dim > 1 "
                f"and at most {SOFTMAX_MAX_ELEMENTS} elements")
    return None


def _squeeze(m, op):
    x = _input(m, op, 0)
    if x is None:
        return None
    rank = len(x.shape)
    dims = op.options.get("squeezeDims") or tuple(i for i, d in enumerate(x.shape) if d == 1)
    leading = next((i for i, d in enumerate(x.shape) if d != 1), rank)
    if any(d % max(rank, 1) >= leading for d in dims):
        return f"SQUEEZE of dims {list(dims)} of {list(x.shape)}: only leading 1s can be squeezed"
    return None


def _strided_slice(m, op):
    problems = []
    strides = _const(m, op, 3)
    if strides is None or np.any(strides != 1):
        problems.append(f"strides {strides.tolist() if strides is not None else 'not constant'}")
    for key in ("ellipsisMask", "newAxisMask"):
        if op.options.get(key, 0):
            problems.append(f"{key}={op.options[key]}")
    return ("STRIDED_SLICE needs all strides 1 and no ellipsis/new-axis mask: " + ", ".join(problems)
            if problems else None)


def _resize_mode(m, op):
    problems = [k for k in ("halfPixelCenters", "alignCorners") if op.options.get(k)]
    x = _input(m, op, 0)
    if x is not None and len(x.shape) != 4:
        problems.append(f"input rank {len(x.shape)}")
    if problems:
        return (f"{op.name} with {', '.join(problems)}: only 3-D data without half-pixel centers or align "
                "corners maps ('Operation version not supported', edgetpu#206)")
    return None


def _resize_size(m, op):
    out = m.tensors[op.outputs[0]]
    if len(out.shape) == 4 and max(out.shape[1:3]) > RESIZE_MAX_SIDE:
        return (f"{op.name} output {list(out.shape)}: large resizes may not map (512x512 failed, 128x128 "
                "mapped, edgetpu#31)")
    return None


def _prelu_alpha(m, op):
    a = _input(m, op, 1)
    if a is not None and _non_unit(a.shape) > 1:
        return f"PReLU alpha '{a.name}' {list(a.shape)} has more than one dim > 1"
    return None


# ------------------------------------------------------------------------------------- model-level checks

def _schema(m):
    return None if m.schema_version == 3 else f"schema version {m.schema_version}, the compiler reads 3"


def _subgraphs(m):
    if m.num_subgraphs > 1:
        return f"{m.num_subgraphs} subgraphs; the compiler handles a single feed-forward subgraph"
    return None


def _min_runtime(m):
    raw = m.metadata.get("min_runtime_version", b"").split(b"\0")[0].decode("ascii", "replace")
    try:
        version = tuple(int(p) for p in raw.split(".")[:2])
    except ValueError:
        return None
    if len(version) == 2 and version > COMPILER_TF:
        return f"the converter marked this model min_runtime_version {raw} (> 2.5, the compiler's TFLite)"
    return None


def _dynamic(m):
    dyn = [t for t in m.tensors if any(d < 0 for d in t.shape_signature)]
    if dyn:
        return f"dynamic dims (-1) in {_names(dyn)}; the compile fails with 'Model not quantized'"
    return None


def _io_batch(m):
    bad = [m.tensors[i] for i in (*m.inputs, *m.outputs)
           if len(m.tensors[i].shape_signature) > 1 and m.tensors[i].shape_signature[0] > 1]
    if bad:
        return f"model input/output {_names(bad)} has batch > 1; the EdgeTPU takes batch 1"
    return None


def _io_dtype(m):
    notes = []
    for kind, idx in (("input", m.inputs), ("output", m.outputs)):
        for t in _tensors(m, idx):
            if t.dtype == "UINT8":
                notes.append(f"{kind} '{t.name}' is uint8 (adds QUANTIZE, needs runtime >= 13)")
            elif t.dtype != "INT8":
                notes.append(f"{kind} '{t.name}' is {t.dtype}: its QUANTIZE/DEQUANTIZE runs on the CPU")
    return "; ".join(notes) or None


def _params(m):
    n = sum(t.data.nbytes for t in m.tensors if t.is_constant)
    if n > PARAM_CACHE_BYTES:
        return f"{n / 2**20:.1f} MiB of parameters exceed the ~8 MiB on-chip cache; the rest streams off-chip"
    return None


# ------------------------------------------------------------------------------------------------ tables

@dataclass(frozen=True)
class OpRule:
    """A per-op check: `check(model, op)` returns a message when `op` breaks the rule."""

    code: str
    level: str
    ops: frozenset[str] | None  # None: every op
    check: Callable[[TFLiteModel, TFLiteOp], str | None]
    fix: str

    def applies(self, op: TFLiteOp) -> bool:
        return self.ops is None or op.name in self.ops or (
            "CUSTOM" in self.ops and op.name.startswith("CUSTOM"))


@dataclass(frozen=True)
class ModelRule:
    """A whole-model check: `check(model)` returns a message when the model breaks the rule."""

    code: str
    level: str
    check: Callable[[TFLiteModel], str | None]
    fix: str


_CONV_LIKE = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV"})
_XQAT_EXPORT = "export with `xqat export` (full int8, int8 I/O, static batch 1)"

OP_RULES: tuple[OpRule, ...] = (
    OpRule("F2", CPU, _CONTROL_FLOW, _control_flow, "remove control flow and variables from the inference graph"),
    OpRule("F3", CPU, frozenset({"CUSTOM"}), _custom,
           "replace the op by builtin ops; do not enable SELECT_TF_OPS when converting"),
    OpRule("F4", FAIL, None, _new_code, "replace the op by ReLU/ReLU6-family builtins that TF 2.5 already had"),
    OpRule("F5", FAIL, None, _version_fail,
           "avoid the feature that bumps the version (grouped conv, fused activation on TransposeConv, "
           "per-channel QUANTIZE, ...) or convert with TF <= 2.8"),
    OpRule("F5", WARN, None, _version_uncertain, "avoid the feature that bumps the op version if the compile fails"),
    OpRule("T1", FAIL, None, _float_tensors,
           f"quantize every layer (no float fallback): {_XQAT_EXPORT}; converter ops TFLITE_BUILTINS_INT8"),
    OpRule("T1", CPU, None, _int_tensors, "keep int32/int64/bool computations out of the inference graph"),
    OpRule("T2", FAIL, None, _quant_params,
           "give every 8-bit tensor one scale > 0 and an in-range zero point (per-tensor activations)"),
    OpRule("T3", FAIL, _CONV_LIKE, _weights_bias, "fold weights into constants: int8 filters, int32 bias"),
    OpRule("T4", FAIL, _CONV_LIKE, _per_axis,
           "quantize FC weights per tensor (`_experimental_disable_per_channel_quantization_for_dense_layers`); "
           "conv filters per output channel only"),
    OpRule("T6", CPU, None, _rank_3, "reshape so at most the 3 innermost dims exceed 1 (no 5-D heads, batch 1)"),
    OpRule("T7", CPU, None, _rank_4, "keep every tensor at rank <= 4"),
    OpRule("T8", FAIL, frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "SUB", "MUL",
                                  "AVERAGE_POOL_2D", "MAX_POOL_2D", "CONCATENATION", "TRANSPOSE_CONV"}),
           _act_overflow, "recalibrate the layer's output range (it is far too narrow for its activation)"),
    OpRule("T8", WARN, None, _tiny_scale, "check the layer's learned range; retrain or remove the dead layer"),
    OpRule("T9", WARN, None, _large_activation, "use a smaller input or split the model (`edgetpu_compiler -d`)"),
    OpRule("T9", WARN, frozenset({"TRANSPOSE"}), _input_transpose, "feed NHWC inputs (no NCHW transpose at the entry)"),
    OpRule("O1", CPU, None, _unsupported,
           "replace the layer by a supported one (ReLU/ReLU6/PReLU instead of LeakyReLU, HardSwish, GELU; "
           "no EXP/DIV/CAST/GATHER)"),
    OpRule("O1", WARN, frozenset(UNVERIFIED_OPS), _unverified, "verify with edgetpu_compiler -s; avoid if possible"),
    OpRule("O2", CPU, frozenset({"CONV_2D", "DEPTHWISE_CONV_2D"}), _dilation, "use the same dilation in x and y"),
    OpRule("O2", FAIL, frozenset({"CONV_2D"}), _grouped,
           "replace grouped conv by per-group convs + concat, or depthwise + 1x1 conv (onnx2tf -dgc)"),
    OpRule("O2", WARN, frozenset({"DEPTHWISE_CONV_2D"}), _depth_multiplier,
           "prefer depth multiplier 1 (depthwise then 1x1 conv)"),
    OpRule("O3", CPU, frozenset({"FULLY_CONNECTED"}), _fc_layout,
           "flatten to (1, features) before the Linear layer so its output is 1-D"),
    OpRule("O4", CPU, frozenset({"AVERAGE_POOL_2D", "MAX_POOL_2D", "CONCATENATION"}), _fused_act,
           "apply the activation before the pooling/concat, or keep it unfused"),
    OpRule("O4", CPU, frozenset({"CONCATENATION"}), _concat_const,
           "do not concatenate constants (zero padding with one zero constant is the only exception)"),
    OpRule("O5", CPU, frozenset({"MEAN", "SUM", "REDUCE_MAX", "REDUCE_MIN", "PAD", "PADV2", "MIRROR_PAD", "PACK",
                                 "SPLIT", "SPLIT_V"}), _axis_batch,
           "do not reduce/pad/pack/split the batch dim; reduce over channels only in multiples of 4"),
    OpRule("O6", CPU, frozenset({"SOFTMAX"}), _softmax,
           "apply softmax to a (1, N) tensor with N <= 16000, or move it to postprocessing"),
    OpRule("O7", CPU, frozenset({"SQUEEZE"}), _squeeze, "squeeze leading 1s only, or use a reshape"),
    OpRule("O7", CPU, frozenset({"STRIDED_SLICE"}), _strided_slice, "slice with stride 1 and plain begin/end"),
    OpRule("O8", CPU, frozenset({"RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR"}), _resize_mode,
           "use nn.Upsample(mode='nearest') (asymmetric, no half-pixel, no align_corners)"),
    OpRule("O8", WARN, frozenset({"RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR"}), _resize_size,
           "resize smaller tensors, or resize in postprocessing"),
    OpRule("O9", CPU, frozenset({"PRELU"}), _prelu_alpha, "share PReLU alpha over H and W (one value per channel)"),
    OpRule("O9", FAIL, frozenset({"TRANSPOSE_CONV"}), _fused_act,
           "keep the activation after ConvTranspose unfused, or convert with TF <= 2.12 (TRANSPOSE_CONV v4)"),
)

MODEL_RULES: tuple[ModelRule, ...] = (
    ModelRule("F1", FAIL, _schema, "re-convert with a current TFLite converter"),
    ModelRule("F2", FAIL, _subgraphs, "export a single feed-forward graph (no control flow, no extra signatures)"),
    ModelRule("F6", WARN, _min_runtime, "the F5 findings say which op raised it"),
    ModelRule("T5", FAIL, _dynamic, "fix every shape: batch 1 via set_shape / a concrete function (§1 Batch)"),
    ModelRule("T5", FAIL, _io_batch, "export with batch 1"),
    ModelRule("O10", WARN, _io_dtype, "export with int8 inputs and outputs (inference_input/output_type=tf.int8)"),
    ModelRule("P2", WARN, _params, "shrink the model to stay within the on-chip cache, or accept slower streaming"),
)
