"""What every EdgeTPU rule module shares: the three levels, the rule records and small flatbuffer helpers.

Levels (docs/edgetpu.md, "Levels"): FAIL = the compiler refuses the model; CPU = the op cannot map, so it runs
on the CPU (and, in the segment model, so does everything after it once the TPU segment has started);
WARN = worth knowing, the verdict does not change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from ..tflite.model import TFLiteModel, TFLiteOp, TFLiteTensor
from ..tflite.qtypes import TENSOR_TYPE_QRANGE

__all__ = ["FAIL", "CPU", "WARN", "OpRule", "ModelRule", "QRANGE", "op_code", "is_boundary_op", "tensors",
           "input_tensor", "const_input", "non_unit", "names", "axis_list", "filter_positions"]

FAIL, CPU, WARN = "FAIL", "CPU", "WARN"

QRANGE = {k: v for k, v in TENSOR_TYPE_QRANGE.items() if k != "INT16"}  # 8-bit types only
_CODES = {k: v for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


@dataclass(frozen=True)
class OpRule:
    """A per-op check: `check(model, op)` returns a message when `op` breaks the rule.

    `note` says where the rule comes from when a compiled pair (the compiler's own output) decided it."""

    code: str
    level: str
    ops: frozenset[str] | None  # None: every op
    check: Callable[[TFLiteModel, TFLiteOp], str | None]
    fix: str
    note: str = ""

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


def op_code(op: TFLiteOp) -> int:
    """The builtin op code of `op` (32 for CUSTOM ops), recovered from its schema name."""
    if op.name.startswith("CUSTOM"):
        return _CODES["CUSTOM"]
    if op.name in _CODES:
        return _CODES[op.name]
    return int(op.name.removeprefix("OP_")) if op.name.startswith("OP_") else -1


def is_boundary_op(m: TFLiteModel, op: TFLiteOp) -> bool:
    """QUANTIZE of a model input, or QUANTIZE/DEQUANTIZE writing a model output: the conversions that float or
    uint8 I/O adds at the edges of the graph (docs/edgetpu.md, "Inputs and outputs")."""
    writes_output = any(o in m.outputs for o in op.outputs)
    if op.name == "QUANTIZE":
        return writes_output or any(i in m.inputs for i in op.inputs)
    return op.name == "DEQUANTIZE" and writes_output


def tensors(m: TFLiteModel, idx) -> list[TFLiteTensor]:
    return [m.tensors[i] for i in idx if i >= 0]


def input_tensor(m: TFLiteModel, op: TFLiteOp, k: int) -> TFLiteTensor | None:
    return m.tensors[op.inputs[k]] if k < len(op.inputs) and op.inputs[k] >= 0 else None


def const_input(m: TFLiteModel, op: TFLiteOp, k: int) -> np.ndarray | None:
    t = input_tensor(m, op, k)
    return t.data if t is not None else None


def non_unit(shape) -> int:
    return sum(1 for d in shape if d != 1)


def names(ts: list[TFLiteTensor], limit: int = 3) -> str:
    shown = [f"'{t.name}' {list(t.shape_signature)}" for t in ts[:limit]]
    more = f" and {len(ts) - limit} more" if len(ts) > limit else ""
    return ", ".join(shown) + more


def axis_list(values: np.ndarray | None, rank: int) -> list[int] | None:
    if values is None:
        return None
    return sorted({int(a) % rank for a in np.ravel(values)}) if rank else []


def filter_positions(op: TFLiteOp) -> tuple[int, int, int]:
    """(activation input, filter, bias) positions of a conv-like op; TRANSPOSE_CONV puts output_shape first."""
    return (2, 1, 3) if op.name == "TRANSPOSE_CONV" else (0, 1, 2)
