"""The op registry of the integer emulator: TFLite op name -> kernel builder, in one table (docs/numerics.md).

`build(op, model, backend, device)` turns one flatbuffer op into a function of its input tensors.
Everything that depends only on the model (multipliers, tables, weights on the device) is computed
once by the builders. Tensors are batched along dim 0: the interpreter runs batch 1, the kernels run N
samples. The builders live by concern: `conv` (convolutions, FULLY_CONNECTED, TRANSPOSE_CONV, BATCH_MATMUL),
`elementwise` (ADD, SUB, MUL), `rectifiers` (RELU family, LEAKY_RELU, HARD_SWISH), `activations` (tables:
LOGISTIC, TANH, GELU; SOFTMAX), `pooling` (pools, MEAN), `movement` (CONCATENATION, RESHAPE, PAD), `layout`
(index maps: transposes, slices, splits, gathers, nearest resize, pixel shuffles; code comparisons),
`resize` (RESIZE_BILINEAR), `normalization` (RSQRT, LayerNorm's), `quantize`; shared pieces in `base` (the op
context, lookup-table kernels) and `requant` (output stages, activation clamps). Backend differences are data in
`rules`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...errors import EmulationError
from ...tflite.model import TFLiteModel, TFLiteOp
from .activations import lut_op, softmax
from .base import TORCH_DTYPES, Kernel, Op, batched_shape
from .conv import batch_matmul, conv_like, fully_connected, transpose_conv
from .elementwise import add, mul, sub
from .layout import (
    arg_extreme,
    depth_space,
    gather,
    maximum_minimum,
    pack,
    reduce_extreme,
    resize_nearest,
    slice_op,
    split,
    strided_slice,
    tile,
    transpose,
    unpack,
)
from .movement import concatenation, pad, reshape
from .normalization import rsqrt
from .pooling import mean, pool
from .quantize import dequantize, float_quantizer, quantize
from .rectifiers import hard_swish, leaky_relu, relu
from .resize import resize_bilinear
from .rules import REFERENCE_LACKS

__all__ = ["build", "SUPPORTED_OPS", "TORCH_DTYPES", "batched_shape", "float_quantizer"]

_BUILDERS: dict[str, Callable[[Op], Kernel]] = {
    "CONV_2D": lambda o: conv_like(o, depthwise=False),
    "DEPTHWISE_CONV_2D": lambda o: conv_like(o, depthwise=True),
    "FULLY_CONNECTED": fully_connected,
    "TRANSPOSE_CONV": transpose_conv,
    "BATCH_MATMUL": batch_matmul,
    "ADD": add,
    "SUB": sub,
    "MUL": mul,
    "AVERAGE_POOL_2D": lambda o: pool(o, "avg"),
    "MAX_POOL_2D": lambda o: pool(o, "max"),
    "MEAN": mean,
    "CONCATENATION": concatenation,
    "RESHAPE": reshape,
    "PAD": pad,
    "PADV2": pad,
    "QUANTIZE": quantize,
    "DEQUANTIZE": dequantize,
    "LOGISTIC": lambda o: lut_op(o, "logistic"),
    "TANH": lambda o: lut_op(o, "tanh"),
    "GELU": lambda o: lut_op(o, "gelu"),
    "SOFTMAX": softmax,
    "TRANSPOSE": transpose,
    "SLICE": slice_op,
    "STRIDED_SLICE": strided_slice,
    "SPLIT": split,
    "SPLIT_V": split,
    "GATHER": gather,
    "RESIZE_NEAREST_NEIGHBOR": resize_nearest,
    "RESIZE_BILINEAR": resize_bilinear,
    "MAXIMUM": maximum_minimum,
    "MINIMUM": maximum_minimum,
    "DEPTH_TO_SPACE": depth_space,
    "SPACE_TO_DEPTH": depth_space,
    "TILE": tile,
    "PACK": pack,
    "UNPACK": unpack,
    "REDUCE_MAX": reduce_extreme,
    "REDUCE_MIN": reduce_extreme,
    "ARG_MAX": arg_extreme,
    "ARG_MIN": arg_extreme,
    "RELU": relu,
    "RELU6": relu,
    "RELU_N1_TO_1": relu,
    "LEAKY_RELU": leaky_relu,
    "HARD_SWISH": hard_swish,
    "RSQRT": rsqrt,
}
SUPPORTED_OPS = frozenset(_BUILDERS)


def build(op: TFLiteOp, model: TFLiteModel, backend: str, device: torch.device, threads: int = 1) -> Kernel:
    """The kernel of one op on one backend; unsupported ops raise EmulationError naming the op."""
    if op.name not in _BUILDERS:
        raise EmulationError(
            f"op #{op.index} {op.name} (output tensor '{model.tensor(op.outputs[0]).name}') is not supported "
            f"by the integer emulator; supported ops: {', '.join(sorted(SUPPORTED_OPS))}")
    if backend == "reference" and op.name in REFERENCE_LACKS:
        raise EmulationError(
            f"op #{op.index} {op.name} (output tensor '{model.tensor(op.outputs[0]).name}'): the interpreter's "
            f"reference kernels have no int8 {op.name}, so it refuses this model on backend 'reference'; "
            "use 'builtin' or 'xnnpack'")
    return _BUILDERS[op.name](Op(op, model, backend, torch.device(device), threads))
