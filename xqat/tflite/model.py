"""Read a .tflite flatbuffer into plain Python objects: ops with codes and versions, tensors with
quantization and constant data.

Op codes and versions come from the file itself (not from an interpreter), which is what the EdgeTPU
checker, the integer emulator and the export report need. Uses the schema bindings shipped with
ai-edge-litert, so reading a model does not import TensorFlow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from ..errors import TFLiteFileError

__all__ = ["TFLiteModel", "TFLiteOp", "TFLiteTensor", "read_tflite"]

_OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
_TYPE_NAMES = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
_ACT_NAMES = {v: k for k, v in vars(schema.ActivationFunctionType).items() if not k.startswith("_")}
_PAD_NAMES = {v: k for k, v in vars(schema.Padding).items() if not k.startswith("_")}
_NP_DTYPES = {
    "FLOAT32": np.float32, "FLOAT16": np.float16, "FLOAT64": np.float64, "INT8": np.int8, "UINT8": np.uint8,
    "INT16": np.int16, "UINT16": np.uint16, "INT32": np.int32, "UINT32": np.uint32, "INT64": np.int64,
    "UINT64": np.uint64, "BOOL": np.bool_,
}


@dataclass(frozen=True)
class TFLiteTensor:
    """One tensor of the main subgraph. `scales`/`zero_points` are empty for unquantized tensors."""

    index: int
    name: str
    dtype: str  # schema name: "INT8", "FLOAT32", ...
    shape: tuple[int, ...]
    shape_signature: tuple[int, ...]  # -1 marks a dynamic dimension
    scales: np.ndarray
    zero_points: np.ndarray
    quantized_dimension: int
    data: np.ndarray | None  # constant contents, shaped; None for activations
    is_variable: bool = False  # state the runtime keeps between invocations (LSTM/RNN), readable before written

    @property
    def np_dtype(self):
        return _NP_DTYPES.get(self.dtype)

    @property
    def is_quantized(self) -> bool:
        return self.scales.size > 0

    @property
    def is_constant(self) -> bool:
        return self.data is not None


@dataclass(frozen=True)
class TFLiteOp:
    """One operator: builtin name (or CUSTOM:<code>), op version from the file, tensor indices, options."""

    index: int
    name: str
    version: int
    inputs: tuple[int, ...]  # -1 marks an omitted optional input
    outputs: tuple[int, ...]
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def fused_activation(self) -> str:
        return self.options.get("fusedActivationFunction", "NONE")


@dataclass(frozen=True)
class TFLiteModel:
    """The main subgraph of a .tflite file, plus how many subgraphs the file has."""

    ops: tuple[TFLiteOp, ...]
    tensors: tuple[TFLiteTensor, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    num_subgraphs: int
    source: str
    schema_version: int = 3  # Model.version of the flatbuffer (3 for every current converter)
    metadata: dict[str, bytes] = field(default_factory=dict)  # e.g. "min_runtime_version" -> b"1.14.0"
    raw: bytes = field(default=b"", repr=False, compare=False)  # the file's bytes (the validator verifies them)

    def tensor(self, index: int) -> TFLiteTensor:
        return self.tensors[index]

    @cached_property
    def producers(self) -> dict[int, TFLiteOp]:
        """Tensor index -> the op that writes it."""
        return {t: op for op in self.ops for t in op.outputs}

    @cached_property
    def consumers(self) -> dict[int, list[TFLiteOp]]:
        """Tensor index -> the ops that read it."""
        out: dict[int, list[TFLiteOp]] = {}
        for op in self.ops:
            for t in op.inputs:
                if t >= 0:
                    out.setdefault(t, []).append(op)
        return out

    def op_names(self) -> list[str]:
        return [op.name for op in self.ops]


def _options(op_t) -> dict[str, Any]:
    opts = op_t.builtinOptions
    if opts is None:
        return {}
    out = {}
    for k, v in vars(opts).items():
        if k == "fusedActivationFunction":
            v = _ACT_NAMES.get(v, v)
        elif k == "padding":
            v = _PAD_NAMES.get(v, v)
        elif isinstance(v, np.ndarray):
            v = tuple(int(x) for x in v)
        out[k] = v
    return out


def _tensor(i: int, t, buffers) -> TFLiteTensor:
    dtype = _TYPE_NAMES.get(t.type, str(t.type))
    shape = tuple(int(d) for d in (t.shape if t.shape is not None else ()))
    sig = tuple(int(d) for d in t.shapeSignature) if t.shapeSignature is not None else shape
    q = t.quantization
    scales = np.asarray(q.scale if q is not None and q.scale is not None else [], np.float32)
    zps = np.asarray(q.zeroPoint if q is not None and q.zeroPoint is not None else [], np.int64)
    data = None
    try:  # flatbuffer strings are UTF-8; the interpreter's Python API fails on anything else
        name = t.name.decode("utf-8") if isinstance(t.name, bytes) else str(t.name)
    except UnicodeDecodeError:
        raise TFLiteFileError(f"tensor {i} has a name that is not UTF-8 text") from None
    if not 0 <= t.buffer < len(buffers):
        raise TFLiteFileError(f"tensor {i} '{name}' points at buffer {t.buffer}, but the file has {len(buffers)} "
                              "buffers")
    buf = buffers[t.buffer] if t.buffer > 0 else None
    if buf is not None and buf.data is not None and len(buf.data) and dtype in _NP_DTYPES:
        raw = np.asarray(buf.data, np.uint8).tobytes()
        item = np.dtype(_NP_DTYPES[dtype]).itemsize
        if any(d < 0 for d in shape) or len(raw) != item * math.prod(shape):
            raise TFLiteFileError(f"constant tensor {i} '{name}' declares shape {list(shape)} ({dtype}) but its "
                                  f"buffer holds {len(raw)} bytes")
        data = np.frombuffer(raw, _NP_DTYPES[dtype]).reshape(shape)
    return TFLiteTensor(i, name, dtype, shape, sig, scales, zps,
                        int(q.quantizedDimension) if q is not None else 0, data, bool(t.isVariable))


def _metadata(m) -> dict[str, bytes]:
    out = {}
    for md in m.metadata or []:
        name = md.name.decode("utf-8", "replace") if isinstance(md.name, bytes) else str(md.name)
        buf = m.buffers[md.buffer] if 0 <= md.buffer < len(m.buffers) else None
        data = getattr(buf, "data", None)
        out[name] = np.asarray(data, np.uint8).tobytes() if data is not None else b""
    return out


def read_tflite(model: str | Path | bytes) -> TFLiteModel:
    """Parse a .tflite file (path or bytes). A missing or corrupt file raises TFLiteFileError."""
    if isinstance(model, (bytes, bytearray)):
        raw, source = bytes(model), "<bytes>"
    else:
        path = Path(model)
        if not path.is_file():
            raise TFLiteFileError(f"{path}: no such .tflite file")
        raw, source = path.read_bytes(), str(path)
    if len(raw) < 8 or raw[4:8] != b"TFL3":
        raise TFLiteFileError(f"{source}: not a TFLite flatbuffer (missing the 'TFL3' identifier); "
                              "is it a corrupt or truncated file?")
    try:
        m = schema.ModelT.InitFromPackedBuf(raw, 0)
        sg = m.subgraphs[0]
        codes = []
        for c in m.operatorCodes:
            code = max(int(c.builtinCode), int(c.deprecatedBuiltinCode))
            name = _OP_NAMES.get(code, f"OP_{code}")
            if name == "CUSTOM":
                cc = c.customCode.decode() if isinstance(c.customCode, bytes) else c.customCode
                name = f"CUSTOM:{cc}"
            codes.append((name, int(c.version)))
        tensors = tuple(_tensor(i, t, m.buffers) for i, t in enumerate(sg.tensors))
        ops = tuple(
            TFLiteOp(i, *codes[o.opcodeIndex],
                     tuple(int(x) for x in (o.inputs if o.inputs is not None else ())),
                     tuple(int(x) for x in (o.outputs if o.outputs is not None else ())), _options(o))
            for i, o in enumerate(sg.operators or [])
        )
        return TFLiteModel(ops, tensors, tuple(int(x) for x in sg.inputs), tuple(int(x) for x in sg.outputs),
                           len(m.subgraphs), source, int(m.version), _metadata(m), raw)
    except TFLiteFileError as e:
        raise TFLiteFileError(f"{source}: {e}; the file is corrupt") from e  # _tensor's errors lack the source
    except Exception as e:  # flatbuffers raises assorted errors on garbage
        raise TFLiteFileError(f"{source}: cannot parse the TFLite flatbuffer ({type(e).__name__}: {e}); "
                              "the file is corrupt or was written by an incompatible tool") from e
