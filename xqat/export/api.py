"""`export_tflite`: a trained QAT model -> Q/DQ ONNX -> onnx2tf (xqat handlers) -> TFLite converter ->
a full-integer .tflite whose every scale and zero point is the one learned in torch, verified.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ExportError
from ..tflite.metadata import XQAT_KEY, with_metadata
from ..torch_side.modules import QConv2d, WeightQuantizedModule
from ..torch_side.prepare import POINTS
from .atomic import atomic_write_bytes, check_writable
from .report import ExportReport, TensorRow
from .tflite_convert import Conversion, convert_qdq_onnx
from .torch_to_onnx import OnnxExport, export_onnx

__all__ = ["export_tflite", "IO_DTYPES"]

IO_DTYPES = ("int8", "uint8", "float32")


def _example(example_inputs, batch_size: int | None) -> tuple[torch.Tensor, ...]:
    xs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    out = []
    for i, x in enumerate(xs):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ExportError(f"example input {i} must be a float tensor (NCHW for images), got "
                              f"{type(x).__name__}{'' if not isinstance(x, torch.Tensor) else ' ' + str(x.dtype)}")
        if x.dim() == 0:
            raise ExportError(f"example input {i} must have a batch dimension")
        x = x.detach().float().cpu()
        if batch_size is not None:
            x = x[:1].expand(batch_size, *x.shape[1:]).contiguous()
        out.append(x)
    return tuple(out)


def export_tflite(model: nn.Module, example_inputs, path: str | os.PathLike, io_dtype: str = "int8", *,
                  batch_size: int | None = 1, saved_model_dir: str | os.PathLike | None = None,
                  edgetpu: bool = False, strict: bool = True) -> ExportReport:
    """Export a `prepare_qat` model as a full-integer .tflite and verify it against the torch side.

    - `io_dtype`: "int8" (default), "uint8", or "float32" (float I/O around an int8 graph).
    - `batch_size`: static batch (1 by default, as the EdgeTPU needs); None keeps the example's.
    - `saved_model_dir`: also keep the TF graph of FakeQuant ops as a SavedModel there.
    - `edgetpu`: refuse layers that can never map to the EdgeTPU, and check the result with
      `xqat.check_edgetpu` (raising on FAIL or CPU findings).
    - `strict`: raise ExportError if any check of the report fails (nothing is written then).

    Ranges are snapped in place first (see `xqat.snap_range`), so the torch simulation keeps computing
    exactly what the .tflite computes; the report lists every range that moved. The file is written
    atomically: a failed export leaves nothing behind.
    """
    if io_dtype not in IO_DTYPES:
        raise ExportError(f"io_dtype must be one of {IO_DTYPES}, got {io_dtype!r}")
    target = check_writable(path, what=".tflite file")
    if edgetpu:
        from ..edgetpu.layers import edgetpu_layer_problems

        problems = edgetpu_layer_problems(model)
        if problems:
            raise ExportError("layers that can never run on the EdgeTPU:\n  " + "\n  ".join(problems))
    t0 = time.perf_counter()
    example = _example(example_inputs, batch_size)
    onnx_export = export_onnx(model, example)
    t1 = time.perf_counter()
    conversion = convert_qdq_onnx(onnx_export.model, io_dtype=io_dtype, batch_size=batch_size,
                                  saved_model_dir=saved_model_dir)
    report = build_report(model, onnx_export, conversion, str(target), tuple(example[0].shape))
    report.seconds = {"torch->onnx": t1 - t0, **{k: v for k, v in conversion.seconds.items() if k != "total"},
                      "total": time.perf_counter() - t0}
    if strict and not report.ok:
        raise ExportError(f"the .tflite for {type(model).__name__} failed verification, nothing was written:\n  "
                          + "\n  ".join(report.problems()))
    if edgetpu:
        from ..edgetpu.check import check_edgetpu

        tpu = check_edgetpu(conversion.tflite)
        if not tpu.fully_mapped:
            raise ExportError("the .tflite would not run fully on the EdgeTPU, nothing was written:\n"
                              + tpu.table())
    atomic_write_bytes(target, with_metadata(conversion.tflite, XQAT_KEY, mapping_metadata(model, report)))
    return report


def mapping_metadata(model: nn.Module, report: ExportReport) -> dict:
    """What the .tflite carries for parity and emulation: every fake-quant point's TFLite tensor, in graph
    order, with its torch label, plus which points are the model input and output."""
    nodes = list(model.graph.nodes)
    keys = [str(n.target)[len(POINTS) + 1:] for n in nodes if n.op == "call_module"
            and str(n.target).startswith(POINTS + ".")]
    out_node = next(n for n in reversed(nodes) if n.op == "output")
    out_arg = out_node.args[0]
    out_arg = out_arg[0] if isinstance(out_arg, (tuple, list)) else out_arg
    if not (getattr(out_arg, "op", "") == "call_module" and str(out_arg.target).startswith(POINTS + ".")):
        raise ExportError("the model output is not quantized (its last op has no fake-quant point)")
    return {
        "format": "xqat-mapping-v1",
        "points": [{"key": k, "tensor": report.point_tensors[k]} for k in keys if k in report.point_tensors],
        "labels": {k: report.point_labels[k] for k in keys},
        "input_point": keys[0],
        "output_point": str(out_arg.target)[len(POINTS) + 1:],
        "input_shape": list(report.input_shape),
        "io_dtype": report.io_dtype,
    }


def _torch_weight_codes(m: WeightQuantizedModule) -> tuple[np.ndarray, np.ndarray]:
    """(per-channel scales, int8 codes in TFLite layout) of a weight module, from the torch side."""
    wq, scales, _ = m.export_weights()
    s = scales.reshape(-1, *([1] * (wq.dim() - 1))) if scales.dim() == 1 else scales
    codes = torch.round(wq / s).to(torch.int64)
    if isinstance(m, QConv2d):
        codes = codes.permute(1, 2, 3, 0) if m.is_depthwise else codes.permute(0, 2, 3, 1)  # 1HWC / OHWI
    scales = scales.reshape(-1).numpy().astype(np.float32)
    return scales, codes.numpy()


def build_report(model: nn.Module, ex: OnnxExport, conv: Conversion, path: str,
                 input_shape: tuple[int, ...]) -> ExportReport:
    """Compare every quantized tensor of the .tflite with the torch side and collect the graph checks."""
    tfl = conv.model
    rows: list[TensorRow] = []
    point_tensors: dict[str, int] = {}
    scale_of_onnx: dict[str, float] = {}
    for key, onnx_name in ex.point_tensors.items():
        q = model.get_submodule(f"{POINTS}.{key}").quantizer.snapped()
        scale_of_onnx[onnx_name] = q.scale
        idx = conv.tensor_map.get(onnx_name)
        if onnx_name in conv.fused:  # absorbed by the op after it (PAD into CONV_2D): the grid it reads
            idx = tfl.ops[conv.fused[onnx_name]].inputs[0]
        if idx is not None:
            point_tensors[key] = idx
        t = tfl.tensors[idx] if idx is not None else None
        rows.append(TensorRow("activation", ex.point_labels[key], idx, t.name if t else "", (q.scale,),
                              (q.zero_point - 128,), tuple(map(float, t.scales)) if t else (),
                              tuple(map(int, t.zero_points)) if t else ()))
    weights_by_name = conv.plan.weights_by_name
    for path_name, onnx_w in ex.weight_tensors.items():
        m = model.get_submodule(path_name)
        scales, codes = _torch_weight_codes(m)
        idx = conv.weight_map.get(onnx_w)
        t = tfl.tensors[idx] if idx is not None else None
        tfl_scales = tuple(map(float, t.scales)) if t else ()
        if t is not None and len(tfl_scales) > 1 and len(scales) == 1:  # FC: one scale repeated (§4.4)
            scales = np.repeat(scales, len(tfl_scales))
        same_codes = t is not None and t.data is not None and t.data.shape == codes.shape and \
            bool(np.array_equal(t.data.astype(np.int64), codes))
        rows.append(TensorRow("weight", path_name, idx, t.name if t else "", tuple(map(float, scales)),
                              (0,) * len(scales), tfl_scales, tuple(map(int, t.zero_points)) if t else (),
                              codes_equal=same_codes))
        w = weights_by_name.get(onnx_w)
        if w is not None and w.bias is not None and w.input_activation in scale_of_onnx:
            # §4.4: float32 of the product of the converter's *double* scales, which the canonical ranges
            # of the torch grids determine (up to 1 ulp off float32(s_in * s_w))
            bias_scales = w.bias_scales(conv.plan.activations[w.input_activation].converter_scale)
            bidx = conv.bias_map.get(w.bias)
            bt = tfl.tensors[bidx] if bidx is not None else None
            if bt is not None and bt.scales.size == 1 and np.all(bias_scales == bias_scales[0]):
                bias_scales = bias_scales[:1]  # per-tensor FC: one bias scale
            rows.append(TensorRow("bias", f"{path_name} (bias)", bidx, bt.name if bt else "",
                                  tuple(map(float, bias_scales)), (0,) * len(bias_scales),
                                  tuple(map(float, bt.scales)) if bt else (),
                                  tuple(map(int, bt.zero_points)) if bt else ()))
    in_idx = conv.io_tensor(conv.plan.input_names[0])
    out_idx = conv.io_tensor(conv.plan.output_names[0])
    return ExportReport(
        path=path, io_dtype=conv.io_dtype, ops=[op.name for op in tfl.ops], tensors=rows,
        float_tensors=[tfl.tensors[i].name for i in conv.float_tensors()],
        inner_quantize_ops=conv.inner_ops("QUANTIZE"), inner_transpose_ops=conv.inner_ops("TRANSPOSE"),
        snaps=ex.snaps, point_tensors=point_tensors, point_labels=dict(ex.point_labels), input_index=in_idx,
        output_index=out_idx, input_shape=input_shape, onnx2tf_version=conv.onnx2tf_version)


def save_report_json(report: ExportReport, path: str | os.PathLike) -> Path:
    """Write the report as JSON next to the model (atomic)."""
    return atomic_write_bytes(path, report.to_json().encode())
