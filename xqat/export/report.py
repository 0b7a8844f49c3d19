"""The export report: per quantized tensor, the torch side's (scale, zero point) next to the .tflite's,
int8 weight codes compared, the op list, and the checks a full-integer EdgeTPU-ready model must pass.

It also records the torch fake-quant point -> TFLite tensor mapping that parity and emulation use.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from ..table import format_table
from .grid_health import grid_problems
from .torch_to_onnx import SnapRecord

__all__ = ["TensorRow", "ExportReport"]


@dataclass(frozen=True)
class TensorRow:
    """One quantized tensor: torch name, TFLite tensor, and both quantization parameters."""

    kind: str  # "activation" | "weight" | "bias"
    torch_name: str
    tflite_index: int | None
    tflite_name: str
    torch_scale: tuple[float, ...]
    torch_zero_point: tuple[int, ...]
    tflite_scale: tuple[float, ...]
    tflite_zero_point: tuple[int, ...]
    codes_equal: bool | None = None  # weights: int8 codes in the .tflite == torch's fake-quant codes

    @property
    def equal(self) -> bool:
        """Bitwise-equal float32 scales and equal zero points (and codes, for weights)."""
        same = (self.tflite_index is not None and len(self.torch_scale) == len(self.tflite_scale)
                and np.array_equal(np.float32(self.torch_scale), np.float32(self.tflite_scale))
                and tuple(self.torch_zero_point) == tuple(self.tflite_zero_point))
        return bool(same and self.codes_equal is not False)


@dataclass
class ExportReport:
    """What `export_tflite` wrote and what it verified. `ok` is False if any check failed."""

    path: str
    io_dtype: str
    ops: list[str]
    tensors: list[TensorRow]
    float_tensors: list[str]
    inner_quantize_ops: list[int]
    inner_transpose_ops: list[int]
    snaps: list[SnapRecord]
    point_tensors: dict[str, int]  # QuantPoint key -> TFLite tensor index
    point_labels: dict[str, str]  # QuantPoint key -> torch op label
    input_index: int
    output_index: int
    input_shape: tuple[int, ...]
    seconds: dict[str, float] = field(default_factory=dict)
    onnx2tf_version: str = ""

    # -- verdicts ---------------------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every failed check, one line each, naming the tensor or op."""
        out = [f"{r.kind} '{r.torch_name}': torch (scale, zp) {r.torch_scale[:3]}, {r.torch_zero_point[:3]} != "
               f"tflite {r.tflite_scale[:3]}, {r.tflite_zero_point[:3]}"
               + (" (int8 codes differ)" if r.codes_equal is False else "")
               for r in self.tensors if not r.equal]
        if self.io_dtype != "float32" and self.float_tensors:
            out.append(f"float tensors left in a full-integer model: {self.float_tensors[:5]}")
        if self.inner_quantize_ops:
            out.append(f"requantize (QUANTIZE) ops inside the graph at {self.inner_quantize_ops}: tied ranges differ")
        if self.inner_transpose_ops:
            out.append(f"layout TRANSPOSE ops inside the graph at {self.inner_transpose_ops}")
        return out + grid_problems(self.tensors)

    @property
    def ok(self) -> bool:
        return not self.problems()

    @property
    def all_qparams_equal(self) -> bool:
        return all(r.equal for r in self.tensors)

    # -- views ------------------------------------------------------------------------------------------
    def table(self) -> str:
        rows = []
        for r in self.tensors:
            n = len(r.torch_scale)
            scale = f"{r.torch_scale[0]:.6g}" if n == 1 else f"{n} per-channel"
            zp = str(r.torch_zero_point[0]) if n == 1 else "0"
            rows.append([r.kind, r.torch_name, r.tflite_name[:40] if r.tflite_index is not None else "-", scale, zp,
                         r.equal])
        text = [format_table(["kind", "torch", "tflite tensor", "scale", "zp", "equal"], rows,
                             title=f"xqat export -> {self.path} ({self.io_dtype} I/O, input {list(self.input_shape)})")]
        counts: dict[str, int] = {}
        for op in self.ops:
            counts[op] = counts.get(op, 0) + 1
        text.append("ops: " + ", ".join(f"{k} x{v}" for k, v in counts.items()))
        text.append(f"float tensors left: {len(self.float_tensors)}; QUANTIZE inside: "
                    f"{len(self.inner_quantize_ops)}; TRANSPOSE inside: {len(self.inner_transpose_ops)}")
        for s in self.snaps:
            where = ", ".join(s.labels) or s.group
            text.append(f"snapped range of {where}: [{s.old_range[0]:.7g}, {s.old_range[1]:.7g}]"
                        f" -> [{s.new_range[0]:.7g}, {s.new_range[1]:.7g}] (moved {s.delta:.3g}"
                        + (", converter zero point would have differed" if s.converter_disagreed else "")
                        + (f", scale moved {s.scale_moved_ulps} ulp" if s.scale_moved_ulps else "") + ")")
        if self.seconds:
            text.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items()))
        problems = self.problems()
        text.append("result: OK, every scale and zero point equals the torch side" if not problems
                    else "result: FAILED\n  " + "\n  ".join(problems))
        return "\n".join(text)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        d["problems"] = self.problems()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=float)
