"""EdgeTPU op rules (O*): the supported-op table and each op's limits, as functions and data.

Compiled pairs (a model and what `edgetpu_compiler` 16 made of it) are ground truth above Coral's published
table; where one overrides the table, the op's entry in `PAIR_EVIDENCE` says so and the rule's note repeats it
(docs/edgetpu.md, "Evidence from compiled pairs"). No rule looks at a model's or a file's name.
"""

from __future__ import annotations

import numpy as np

from .rules_base import axis_list, const_input, input_tensor, is_boundary_op, names, non_unit, op_code, tensors
from .versions import MAX_BUILTIN_CODE

# Coral's table (runtime <= 14), plus what compiled pairs showed to map. LSTM means unidirectional only.
SUPPORTED_OPS = frozenset({
    "ADD", "SUB", "MUL", "MAXIMUM", "MINIMUM", "AVERAGE_POOL_2D", "MAX_POOL_2D", "CONCATENATION", "CONV_2D",
    "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "EXPAND_DIMS", "PACK", "QUANTIZE", "SUM", "TRANSPOSE_CONV",
    "L2_NORMALIZATION", "LOGISTIC", "TANH", "RELU", "RELU6", "RELU_N1_TO_1", "LSTM",
    "UNIDIRECTIONAL_SEQUENCE_LSTM", "MEAN", "PAD", "PRELU", "REDUCE_MAX", "REDUCE_MIN", "RESHAPE",
    "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "SLICE", "SPACE_TO_DEPTH", "SPLIT", "SOFTMAX", "SQUEEZE",
    "STRIDED_SLICE", "TILE",
})
# What compiled pairs showed, where it adds to or overrides the table (docs/edgetpu.md, "Evidence from compiled pairs").
PAIR_EVIDENCE = {
    "TILE": "not in Coral's table, but a compiled MobileNet-EdgeTPU DeepLab mapped it (the pair wins)",
    "UNIDIRECTIONAL_SEQUENCE_LSTM": "a compiled int8 Keras LSTM mapped it whole, int16 cell state included",
    "QUANTIZE": "8-bit to 8-bit requantizes inside the graph map (MobileNet-EdgeTPU DeepLab, PoseNet pairs); "
                "from float it is CPU",
    "RESIZE_BILINEAR": "align_corners=True maps (MobileNet-EdgeTPU DeepLab, from DeepLab code that always sets "
                       "it); a resize from a 1x1 map and one to a 513x513 output stayed on the CPU (DeepLab pairs)",
    "CUSTOM": "a custom op runs on the CPU and the model still compiles (PoseNet with its decoder op)",
}
# Listed only in newer, partly read copies of the table, or listed but known to map poorly: WARN, still mapped.
UNVERIFIED_OPS = {
    "TRANSPOSE": "listed for runtime >= 14 only in newer copies of Coral's table; older compilers leave it on "
                 "the CPU (edgetpu#193, #317)",
    "RSQRT": "listed for runtime >= 14 only in newer copies of Coral's table",
    "SQUARED_DIFFERENCE": "listed for runtime >= 14 only in newer copies of Coral's table",
    "SPLIT_V": "not in the copies of Coral's table read; only SPLIT is",
    "TRANSPOSE_CONV": "listed, but often reported as not mapped (edgetpu#684, #686)",
}
# Ops outside the table with a known reason or replacement, for a better O1 message.
NOT_MAPPED = {
    "PADV2": "only PAD (zero padding) is; after a ReLU, a padded max-pool gives the same result with PAD",
    "HARD_SWISH": "edgetpu#272, #597; prepare with QATConfig(edgetpu=True) (hard swish then runs as ADD, MUL, MUL, "
                  "which map), use ReLU/ReLU6, or accept the CPU tail",
    "LEAKY_RELU": "edgetpu#272; use ReLU, or PReLU with alpha shared over H and W",
    "GELU": "edgetpu#818; use ReLU/ReLU6",
    "DEQUANTIZE": "the EdgeTPU has no float",
    "BATCH_MATMUL": "a matmul with a constant operand converts to FULLY_CONNECTED, which maps",
    "ARG_MAX": "take the argmax in postprocessing",
    "CAST": "cast in preprocessing, or feed the model int8/uint8",
}
CONTROL_FLOW = frozenset({"WHILE", "IF", "CALL_ONCE", "VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE"})

SOFTMAX_MAX_ELEMENTS = 16_000  # Coral's table: Softmax
MEAN_Z_MULTIPLE = 4  # Coral's table: a Mean over channels needs a multiple of 4
# 128x128 mapped and 512x512 did not (edgetpu#31); a compiled DeepLab left its 513x513 output resize on the CPU
# while its smaller resizes mapped. The cut between 128 and 512 is a guess.
RESIZE_MAX_SIDE = 256


def unsupported(m, op):
    if (op.name in SUPPORTED_OPS or op.name in UNVERIFIED_OPS or op.name in CONTROL_FLOW
            or op.name.startswith("CUSTOM") or op_code(op) > MAX_BUILTIN_CODE or is_boundary_op(m, op)):
        return None
    why = NOT_MAPPED.get(op.name)
    return f"{op.name} is not in the EdgeTPU's supported-op table" + (f" ({why})" if why else "")


def unverified(m, op):
    return f"{op.name}: {UNVERIFIED_OPS[op.name]}"


def dilation(m, op):
    h, w = op.options.get("dilationHFactor", 1), op.options.get("dilationWFactor", 1)
    if h != w:
        return f"dilation {h}x{w} differs between height and width"
    return None


def grouped(m, op):
    x, w = input_tensor(m, op, 0), input_tensor(m, op, 1)
    if x is not None and w is not None and len(x.shape) == 4 and len(w.shape) == 4 and x.shape[3] != w.shape[3]:
        return (f"grouped conv: input has {x.shape[3]} channels, filter '{w.name}' takes {w.shape[3]} "
                f"({x.shape[3] // max(w.shape[3], 1)} groups); CONV_2D v6 fails to compile (edgetpu#631)")
    return None


def depth_multiplier(m, op):
    x, w = input_tensor(m, op, 0), input_tensor(m, op, 1)
    if x is not None and w is not None and len(x.shape) == 4 and len(w.shape) == 4 and w.shape[3] != x.shape[3]:
        return f"depthwise conv with depth multiplier {w.shape[3] // max(x.shape[3], 1)} (unverified on EdgeTPU)"
    return None


def fc_layout(m, op):
    problems = []
    if op.options.get("weightsFormat", 0) != 0:
        problems.append("weights are not in the DEFAULT format")
    if op.options.get("keepNumDims", False):
        problems.append("keep_num_dims is set")
    out = m.tensors[op.outputs[0]] if op.outputs else None
    if out is not None and non_unit(out.shape) > 1:
        problems.append(f"output '{out.name}' {list(out.shape_signature)} has more than one dim > 1")
    return ("fully connected: " + "; ".join(problems)) if problems else None


def fused_act(m, op):
    if op.fused_activation != "NONE":
        return f"{op.name} has a fused {op.fused_activation} activation"
    return None


def concat_const(m, op):
    consts = [t for t in tensors(m, op.inputs) if t.is_constant]
    if not consts:
        return None
    zero = all(np.all(t.data.astype(np.int64) == (int(t.zero_points[0]) if t.zero_points.size else 0))
               for t in consts)
    if len(op.inputs) == 2 and zero:
        return None
    return (f"concatenation with constant input {names(consts)}: allowed only with exactly 2 inputs and an "
            "all-zero constant")


def axis_batch(m, op):
    x = input_tensor(m, op, 0)
    rank = len(x.shape) if x is not None else 0
    if op.name in ("MEAN", "SUM", "REDUCE_MAX", "REDUCE_MIN"):
        axes = axis_list(const_input(m, op, 1), rank)
        if axes is None:
            return f"{op.name} axes are not a constant"
        if rank > 1 and 0 in axes:
            return f"{op.name} reduces the batch dim"
        if op.name == "MEAN" and rank >= 3 and rank - 1 in axes and x.shape[-1] % MEAN_Z_MULTIPLE:
            return (f"MEAN over the channel dim of {x.shape[-1]} channels (needs a multiple of "
                    f"{MEAN_Z_MULTIPLE})")
    elif op.name in ("PAD", "PADV2", "MIRROR_PAD"):
        pads = const_input(m, op, 1)
        if pads is None:
            return "PAD paddings are not a constant"
        if rank > 1 and np.any(pads[0] != 0):
            return f"{op.name} pads the batch dim ({pads[0].tolist()})"
    elif op.name == "PACK":
        out = m.tensors[op.outputs[0]]
        if len(out.shape) > 1 and op.options.get("axis", 0) % len(out.shape) == 0:
            return "PACK along the batch dim"
    elif op.name in ("SPLIT", "SPLIT_V"):
        axis_k, x = (0, input_tensor(m, op, 1)) if op.name == "SPLIT" else (2, input_tensor(m, op, 0))
        rank = len(x.shape) if x is not None else 0
        axes = axis_list(const_input(m, op, axis_k), rank)
        if axes is None:
            return f"{op.name} axis is not a constant"
        if rank > 1 and 0 in axes:
            return f"{op.name} splits the batch dim"
    return None


def softmax(m, op):
    x = input_tensor(m, op, 0)
    n = int(np.prod(x.shape)) if x is not None else 0
    if x is not None and (non_unit(x.shape) > 1 or n > SOFTMAX_MAX_ELEMENTS):
        return (f"softmax input '{x.name}' {list(x.shape_signature)} ({n} elements): the EdgeTPU takes 1 dim > 1 "
                f"and at most {SOFTMAX_MAX_ELEMENTS} elements")
    return None


def squeeze(m, op):
    x = input_tensor(m, op, 0)
    if x is None:
        return None
    rank = len(x.shape)
    dims = op.options.get("squeezeDims") or tuple(i for i, d in enumerate(x.shape) if d == 1)
    leading = next((i for i, d in enumerate(x.shape) if d != 1), rank)
    if any(d % max(rank, 1) >= leading for d in dims):
        return f"SQUEEZE of dims {list(dims)} of {list(x.shape)}: only leading 1s can be squeezed"
    return None


def strided_slice(m, op):
    problems = []
    strides = const_input(m, op, 3)
    if strides is None or np.any(strides != 1):
        problems.append(f"strides {strides.tolist() if strides is not None else 'not constant'}")
    for key in ("ellipsisMask", "newAxisMask"):
        if op.options.get(key, 0):
            problems.append(f"{key}={op.options[key]}")
    return ("STRIDED_SLICE needs all strides 1 and no ellipsis/new-axis mask: " + ", ".join(problems)
            if problems else None)


def resize_mode(m, op):
    """Half-pixel centers (both resizes, version 3) and align-corners (nearest neighbour only, version 3) log
    'Operation version not supported'; bilinear with align-corners maps (compiled pair)."""
    keys = ("halfPixelCenters",) if op.name == "RESIZE_BILINEAR" else ("halfPixelCenters", "alignCorners")
    problems = [k for k in keys if op.options.get(k)]
    x = input_tensor(m, op, 0)
    if x is not None and len(x.shape) != 4:
        problems.append(f"input rank {len(x.shape)}")
    if problems:
        return (f"{op.name} with {', '.join(problems)} does not map ('Operation version not supported', "
                "edgetpu#206)")
    return None


def resize_from_1x1(m, op):
    x, out = input_tensor(m, op, 0), m.tensors[op.outputs[0]]
    if x is not None and len(x.shape) == 4 and x.shape[1:3] == (1, 1) and out.shape[1:3] != (1, 1):
        return (f"{op.name} from a 1x1 map to {list(out.shape[1:3])} (a broadcast) stays on the CPU, as the "
                "image-pooling resize of a compiled DeepLab did")
    return None


def resize_size(m, op):
    out = m.tensors[op.outputs[0]]
    if len(out.shape) == 4 and max(out.shape[1:3]) > RESIZE_MAX_SIDE:
        return (f"{op.name} output {list(out.shape)}: resizes past {RESIZE_MAX_SIDE} a side stay on the CPU "
                "(a 512x512 and a 513x513 resize did; 128x128 mapped)")
    return None


def prelu_alpha(m, op):
    a = input_tensor(m, op, 1)
    if a is not None and non_unit(a.shape) > 1:
        return f"PReLU alpha '{a.name}' {list(a.shape)} has more than one dim > 1"
    return None
