"""The export report: per quantized tensor, the torch side's (scale, zero point) next to the .tflite's,
int8 weight codes compared, the op list, and the checks a full-integer EdgeTPU-ready model must pass.

It also records the torch fake-quant point -> TFLite tensor mapping that parity and emulation use.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from ..table import format_table
from ..torch_side.modules import QConv2d, WeightQuantizedModule
from .grid_health import grid_problems
from .snapping import SnapRecord
from .tflite_convert import Conversion
from .torch_to_onnx import OnnxExport

__all__ = ["TensorRow", "ExportReport", "build_report"]


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
    snaps: list[SnapRecord]  # every learned range whose deployed (snapped) form differs from the model's
    point_tensors: dict[str, int]  # QuantPoint key -> TFLite tensor index
    point_labels: dict[str, str]  # QuantPoint key -> torch op label
    input_indices: list[int]  # TFLite tensor of each model input, in input order
    output_indices: list[int]  # TFLite tensor of each model output, in output order
    input_shapes: list[tuple[int, ...]]  # NCHW (torch) shape of each input
    io_mismatches: list[str] = field(default_factory=list)  # inputs / outputs not of `io_dtype` in the .tflite
    seconds: dict[str, float] = field(default_factory=dict)
    onnx2tf_version: str = ""

    @property
    def input_index(self) -> int:
        """The first input's TFLite tensor (models with one input)."""
        return self.input_indices[0]

    @property
    def output_index(self) -> int:
        """The first output's TFLite tensor (models with one output)."""
        return self.output_indices[0]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.input_shapes[0]

    # -- verdicts ---------------------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every failed check, one line each, naming the tensor or op."""
        out = [f"{r.kind} '{r.torch_name}': torch (scale, zp) {r.torch_scale[:3]}, {r.torch_zero_point[:3]} != "
               f"tflite {r.tflite_scale[:3]}, {r.tflite_zero_point[:3]}"
               + (" (int8 codes differ)" if r.codes_equal is False else "")
               for r in self.tensors if not r.equal]
        if self.io_dtype != "float32" and self.float_tensors:
            out.append(f"float tensors left in a full-integer model: {self.float_tensors[:5]}")
        out += self.io_mismatches
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
                             title=f"xqat export -> {self.path} ({self.io_dtype} I/O, "
                             f"input{'s' if len(self.input_shapes) > 1 else ''} "
                             f"{', '.join(str(list(s)) for s in self.input_shapes)})")]
        counts: dict[str, int] = {}
        for op in self.ops:
            counts[op] = counts.get(op, 0) + 1
        text.append("ops: " + ", ".join(f"{k} x{v}" for k, v in counts.items()))
        text.append(f"float tensors left: {len(self.float_tensors)}; QUANTIZE inside: "
                    f"{len(self.inner_quantize_ops)}; TRANSPOSE inside: {len(self.inner_transpose_ops)}")
        quiet = [s for s in self.snaps if not s.notable]
        if quiet:
            text.append(f"{len(quiet)} ranges rewritten to their TF grid's ends (same grid; the converter now agrees)")
        for s in (s for s in self.snaps if s.notable):
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


def _torch_weight_codes(m: WeightQuantizedModule) -> tuple[np.ndarray, np.ndarray]:
    """(per-channel scales, int8 codes in TFLite layout) of a weight module, from the torch side."""
    wq, scales, _ = m.export_weights()
    shape = [1] * wq.dim()
    shape[m.weight_axis] = -1
    s = scales.reshape(shape) if scales.dim() == 1 else scales
    codes = torch.round(wq / s).to(torch.int64)
    if isinstance(m, QConv2d):
        if codes.dim() == 3:  # Conv1d [O, I, k]: TFLite runs CONV_2D on a [N, 1, W, C] view, filter [O, 1, k, I]
            codes = codes.unsqueeze(2)
        if m.weight_axis == 1:  # ConvTranspose2d [I, O, kh, kw] -> TRANSPOSE_CONV's OHWI
            codes = codes.permute(1, 2, 3, 0)
        else:
            codes = codes.permute(1, 2, 3, 0) if m.is_depthwise else codes.permute(0, 2, 3, 1)  # 1HWC / OHWI
    scales = scales.reshape(-1).numpy().astype(np.float32)
    return scales, codes.numpy()


def _zero_bias(m: WeightQuantizedModule) -> bool:
    """The deployed bias (on its int32 grid) is all zero: the converter leaves it out. A small trained bias
    (a zero-initialised classifier after a few steps) can round to zero there."""
    b = m.export_weights()[2]
    return b is not None and not bool(b.detach().any())


def build_report(model: nn.Module, ex: OnnxExport, conv: Conversion, path: str,
                 input_shapes: list[tuple[int, ...]]) -> ExportReport:
    """Compare every quantized tensor of the .tflite with the torch side and collect the graph checks."""
    tfl = conv.model
    rows: list[TensorRow] = []
    point_tensors: dict[str, int] = {}
    scale_of_onnx: dict[str, float] = {}
    for key, onnx_name in ex.point_tensors.items():
        scale, zero_point = ex.point_qparams[key]
        scale_of_onnx[onnx_name] = scale
        idx = conv.tensor_map.get(onnx_name)
        if onnx_name in conv.fused:  # absorbed by the op after it (PAD into CONV_2D): the grid it reads
            idx = tfl.ops[conv.fused[onnx_name]].inputs[0]
        if idx is not None:
            point_tensors[key] = idx
        t = tfl.tensors[idx] if idx is not None else None
        rows.append(TensorRow("activation", ex.point_labels[key], idx, t.name if t else "", (scale,),
                              (zero_point,), tuple(map(float, t.scales)) if t else (),
                              tuple(map(int, t.zero_points)) if t else ()))
    weights_by_name = conv.plan.weights_by_name
    for path_name, onnx_w in ex.weight_tensors.items():
        m = model.get_submodule(path_name)
        scales, codes = _torch_weight_codes(m)
        if onnx_w in conv.weight_columns:  # a channels-last flatten in front (onnx_layout.py)
            codes = codes[:, conv.weight_columns[onnx_w]]
        idx = conv.weight_map.get(onnx_w)
        t = tfl.tensors[idx] if idx is not None else None
        tfl_scales = tuple(map(float, t.scales)) if t else ()
        if t is not None and len(tfl_scales) > 1 and len(scales) == 1:  # FC: one scale repeated (docs/numerics.md)
            scales = np.repeat(scales, len(tfl_scales))
        same_codes = t is not None and t.data is not None and t.data.shape == codes.shape and \
            bool(np.array_equal(t.data.astype(np.int64), codes))
        rows.append(TensorRow("weight", path_name, idx, t.name if t else "", tuple(map(float, scales)),
                              (0,) * len(scales), tfl_scales, tuple(map(int, t.zero_points)) if t else (),
                              codes_equal=same_codes))
        w = weights_by_name.get(onnx_w)
        if w is not None and w.bias is not None and w.input_activation in scale_of_onnx:
            # float32 of the product of the converter's *double* scales, which the canonical ranges
            # of the torch grids determine (up to 1 ulp off float32(s_in * s_w))
            bias_scales = w.bias_scales(conv.plan.activations[w.input_activation].converter_scale)
            bidx = conv.bias_map.get(w.bias)
            if bidx is None and _zero_bias(m):
                continue  # the converter leaves an all-zero bias out (a bias-free LSTM W_hh step, a tiny bias)
            bt = tfl.tensors[bidx] if bidx is not None else None
            if bt is not None and bt.scales.size == 1 and np.all(bias_scales == bias_scales[0]):
                bias_scales = bias_scales[:1]  # per-tensor FC: one bias scale
            rows.append(TensorRow("bias", f"{path_name} (bias)", bidx, bt.name if bt else "",
                                  tuple(map(float, bias_scales)), (0,) * len(bias_scales),
                                  tuple(map(float, bt.scales)) if bt else (),
                                  tuple(map(int, bt.zero_points)) if bt else ()))
    io = {"input": [conv.io_tensor(n) for n in conv.plan.input_names],
          "output": [conv.io_tensor(n) for n in conv.plan.output_names]}
    want = conv.io_dtype.upper()
    mismatches = [f"model {kind} {k} is {tfl.tensors[i].dtype} in the .tflite, not {want}"
                  for kind, idx in io.items() for k, i in enumerate(idx) if tfl.tensors[i].dtype != want]
    return ExportReport(
        path=path, io_dtype=conv.io_dtype, ops=[op.name for op in tfl.ops], tensors=rows,
        float_tensors=[tfl.tensors[i].name for i in conv.float_tensors()],
        inner_quantize_ops=conv.inner_ops("QUANTIZE"), inner_transpose_ops=conv.layout_transposes(),
        snaps=ex.snaps, point_tensors=point_tensors, point_labels=dict(ex.point_labels), input_indices=io["input"],
        output_indices=io["output"], input_shapes=[tuple(s) for s in input_shapes], io_mismatches=mismatches,
        onnx2tf_version=conv.onnx2tf_version)
